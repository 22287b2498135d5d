"""Kernels: `reference` (plain torch, the numerical definition of every op) and accelerated variants."""
