"""The CPU backend: SDPA attention (causal prefill in query blocks), torch._grouped_mm experts, gloo collectives.

bf16 / fp16 GEMMs run in fp32 on CPUs whose PyTorch has no fast kernel for them (kernels.fp32_compute). Compiled
generation multiplies one token's experts as fused row products (kernels.row_products) and more rows on weights
packed once for oneDNN (kernels.packed_experts); the cross-entropy works in blocks that stay in the L2 cache.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Callable

import torch

from mixtral.backend import Backend, Capabilities, Device, Ops, hookimpl
from mixtral.kernels import (
    blocked_cross_entropy,
    causal_blocks,
    fp32_compute,
    int8_weights,
    native,
    packed_experts,
    row_products,
)
from mixtral.model.moe import GroupedExperts

L2_BLOCK_ELEMENTS = 1 << 19  # cross-entropy's fp32 block: 2 MB, half for each of 2 threads' L2 (16 MB: slower)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """fp32_compute.grouped_mm, and in a compiled inference graph: one token's rows, each on another expert, fused
    whole (row_products.grouped_mm); more rows as one opaque node multiplying packed weights (packed_experts)."""
    if row_products.compiled_inference():
        if x.shape[0] <= row_products.ONE_TOKEN_ROWS:
            return row_products.grouped_mm(x, w, offs)
        return packed_experts.packed_grouped_mm(x, w, offs)
    return fp32_compute.grouped_mm(x, w, offs)


class CPUBackend(Backend):
    def build_ops(self) -> Ops:
        return Ops.reference(
            attention=causal_blocks.attention,
            linear=fp32_compute.linear,
            grouped_mm=grouped_mm,
            rms_norm=native.rms_norm,
            swiglu=native.swiglu,
            int8_linear=int8_weights.linear,
            int8_grouped_mm=int8_weights.grouped_mm,
            cross_entropy=functools.partial(blocked_cross_entropy.cross_entropy, block_elements=L2_BLOCK_ELEMENTS),
        )

    def compile_options(self, inference: bool) -> dict[str, Any]:
        """Generation: inductor's C++ wrapper calls each graph's kernels from C++ rather than Python, a third less
        overhead per decode step (measured: bench/RESULTS.md), and no identity guards on the KV cache
        (unguarded_kv_cache); training steps are GEMM-bound."""
        return {"cpp_wrapper": True, "guard_filter_fn": unguarded_kv_cache} if inference else {}

    def compile(self, module: torch.nn.Module, dynamic: bool | None = None, inference: bool = False) -> None:
        """For generation, as Backend.compile with a batch's decode steps frozen (frozen_when_decoding_a_batch) and
        the experts' weights packed for oneDNN (use_packed_experts): the weights must not change after this call."""
        super().compile(module, dynamic=dynamic, inference=inference)
        if inference:  # nn.Module.compile keeps the compiled call here
            module._compiled_call_impl = frozen_when_decoding_a_batch(module._compiled_call_impl)
            use_packed_experts(module)


# Inductor's C++ GEMM template for a decode step's few rows: it blocks the weight once for all of them, where the
# native bf16 / fp32 GEMM reads it once per row (lm head 8 x 512 x 32000 here: bf16 13.7 -> 3.9 ms, fp32 15 -> 4 ms).
# It multiplies constant weights only: the graph is compiled with its parameters frozen, which inductor reads when
# dynamo traces, so it is set around the call rather than in the compile options.
BATCHED_DECODE_CONFIG = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def unguarded_kv_cache(guards: list) -> list[bool]:
    """Keeps every dynamo guard but the identity checks a frozen graph puts on the KV cache: the graph writes the
    cache, so it stays a graph input (not a constant), and a cache reallocated for another batch and back would
    otherwise recompile the step and soon reach dynamo's recompile limit. Its shape guards stay."""
    return [
        not (guard.guard_type == "ID_MATCH" and "kv_cache" in guard.name)  # Attention.kv_cache's buffers
        for guard in guards
    ]


def frozen_when_decoding_a_batch(compiled: Callable) -> Callable:
    """compiled(tokens, ...) with BATCHED_DECODE_CONFIG where tokens is one new token for each of several rows.
    Prefill and single-row graphs stay unfrozen: they convert weights to fp32 (fp32_compute, row_products), and
    freezing would fold those conversions into fp32 copies of the weights."""
    from torch._inductor import config as inductor_config

    def call(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if tokens.dim() == 2 and tokens.shape[0] > 1 and tokens.shape[1] == 1:
            with inductor_config.patch(BATCHED_DECODE_CONFIG):
                return compiled(tokens, *args, **kwargs)
        return compiled(tokens, *args, **kwargs)

    return call


def use_packed_experts(module: torch.nn.Module) -> None:
    """Compiled generation multiplies the experts on weights packed once (kernels.packed_experts): the module's
    expert weights are declared frozen, and released with the module."""
    weights = [
        w
        for experts in module.modules()
        if isinstance(experts, GroupedExperts)
        for w in (experts.gate_up_proj, experts.down_proj)
    ]
    weakref.finalize(module, packed_experts.PACKED.release, packed_experts.PACKED.freeze(weights))


@hookimpl
def mixtral_register_backends(register) -> None:
    register(
        CPUBackend(
            name="cpu",
            device_type="cpu",
            dist_backend="gloo",
            capabilities=Capabilities(
                dynamic_shapes=True, preferred_dispatcher="dropless", auto_priority=0, fused_optimizer=True
            ),  # torch's fused AdamW runs on the CPU since 2.4
            planner_devices=(
                Device("cpu", "host CPU (gloo)", "cpu", round(host_memory_gib(), 1), 1, 0.3, 5, 1, 64, 64),
            ),
        )
    )


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
