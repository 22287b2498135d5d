"""The CPU backend: SDPA attention, torch._grouped_mm experts, gloo collectives.

bf16 / fp16 GEMMs run in fp32 on CPUs whose PyTorch has no fast kernel for them (kernels.fp32_compute).
"""

from __future__ import annotations

from typing import Any

from mixtral.backend import Backend, Capabilities, Ops, hookimpl
from mixtral.kernels import fp32_compute, native


class CPUBackend(Backend):
    def build_ops(self) -> Ops:
        return Ops.reference(attention=fp32_compute.attention, linear=fp32_compute.linear, grouped_mm=fp32_compute.grouped_mm,
                             rms_norm=native.rms_norm)

    def compile_options(self, inference: bool) -> dict[str, Any]:
        """Generation: inductor's C++ wrapper calls each graph's kernels from C++ rather than Python, a third less
        overhead per decode step (measured: bench/RESULTS.md); training steps are GEMM-bound."""
        return {"cpp_wrapper": True} if inference else {}


@hookimpl
def mixtral_register_backends(register) -> None:
    register(CPUBackend(name="cpu", device_type="cpu", dist_backend="gloo",
                        capabilities=Capabilities(dynamic_shapes=True, preferred_dispatcher="dropless")))
