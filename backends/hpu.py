"""The Intel Gaudi backend (habana_frameworks): fused SDPA / RMSNorm / RoPE, lazy mode or torch.compile, HCCL.

The adapters below translate our op contract (mixtral.kernels.reference) into Habana's fused kernels. They
take the vendor kernel as their first argument, so tests run them on the CPU against tests/vendor_sim.py.
Sources: habana_frameworks.torch.hpex.kernels (FusedSDPA.py, RotaryPosEmbeddingHelper.py) and
hpex.normalization (FusedRMSNorm.py) as published in HabanaAI/gaudi-pytorch-bridge, and
https://docs.habana.ai/en/latest/PyTorch/Python_Packages.html (hpex kernels), Runtime_Flags.html (PT_HPU_LAZY_MODE).
Grouped GEMM, permute / unpermute and SwiGLU stay the reference ops: the default capacity-bins dispatcher
runs the experts as a static-shape batched matmul, which the graph compiler fuses on its own.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixtral.backend import Availability, Backend, Capabilities, Device, Ops, hookimpl, module_available, peak_by_name
from mixtral.errors import MixtralError
from mixtral.kernels import blocked_cross_entropy


def attention(
    fused_sdpa: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    *,
    softmax_mode: str = "None",
    recompute: bool | None = True,
) -> torch.Tensor:
    """FusedSDPA.apply(q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode, recompute_mode).

    Same layout [B, H, S, D] and bool-mask polarity (True = attend) as torch SDPA; GQA is handled inside the
    kernel. The mask is made 4-D and expanded over [S, T]; causal and a mask together become one mask.
    softmax_mode "None" is the exact softmax ("fast" trades accuracy); recompute=True is the flash-style
    variant that recomputes the probabilities in backward instead of storing them.
    """
    s, t = q.shape[-2], k.shape[-2]
    if mask is not None:
        if causal:
            mask = mask & torch.ones(s, t, dtype=torch.bool, device=q.device).tril()
            causal = False
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(-1, -1, s, t)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return fused_sdpa(q, k, v, mask, 0.0, causal, scale, softmax_mode, recompute)


def rms_norm(
    fused_rms_norm: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """FusedRMSNorm.apply(data_in, gamma, eps): normalises and scales by gamma in one kernel (fp32 inside)."""
    return fused_rms_norm(x, weight.to(x.dtype), eps)


def rope(
    rope_helper: Callable[..., torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RotaryPosEmbeddingHelperV1.apply(p, cos, sin, offset): BLOCKWISE mode is rotate-half.

    cos / sin [S, D] become [1, 1, S, D] to match x [B, H, S, D], and x's dtype: the helper promotes
    everything to fp32 when any input is fp32, which would change the output dtype.
    """
    return rope_helper(x, cos[None, None].to(x.dtype), sin[None, None].to(x.dtype), 0)


def make_ops(fused_sdpa: Any, fused_rms_norm: Any, rope_helper: Any, recompute: bool | None = True) -> Ops:
    """The HPU op table from the three Habana autograd Functions (real ones, or simulations in tests)."""
    return Ops.reference(
        attention=functools.partial(attention, fused_sdpa.apply, recompute=recompute),
        rms_norm=functools.partial(rms_norm, fused_rms_norm.apply),
        rope=functools.partial(rope, rope_helper.apply),
        cross_entropy=blocked_cross_entropy.cross_entropy,
    )


def lazy_mode() -> bool:
    """PT_HPU_LAZY_MODE=1 selects the legacy lazy mode (graphs cut at mark_step); 0, the default, is eager + compile."""
    return os.environ.get("PT_HPU_LAZY_MODE", "0") == "1"


class HPUBackend(Backend):
    def probe(self) -> Availability:
        found = module_available("habana_frameworks.torch", self.install_hint)
        if not found.ok:
            return found
        import habana_frameworks.torch.hpu as hthpu

        if not hthpu.is_available():
            return Availability(False, "habana_frameworks is installed but no Gaudi device is visible")
        return Availability(True)

    def build_ops(self) -> Ops:
        from habana_frameworks.torch.hpex.kernels import (
            FusedSDPA,
            RotaryPosEmbeddingHelperV1,
        )
        from habana_frameworks.torch.hpex.normalization import FusedRMSNorm

        recompute = self.options.get("fused_sdpa_recompute", True)  # HL_USE_FUSED_SDPA_WITH_RECOMPUTE
        return make_ops(FusedSDPA, FusedRMSNorm, RotaryPosEmbeddingHelperV1, recompute)

    def mark_step(self) -> None:
        """In lazy mode, run the accumulated graph (after backward and after the optimizer step)."""
        if lazy_mode():
            import habana_frameworks.torch.core as htcore

            htcore.mark_step()

    def compile(self, module: nn.Module, dynamic: bool | None = None, inference: bool = False) -> None:
        """The eager-mode alternative to lazy mode: torch.compile with Habana's graph backend."""
        if lazy_mode():
            raise MixtralError(
                "torch.compile needs Gaudi's eager mode: set PT_HPU_LAZY_MODE=0 (lazy mode builds its "
                "own graphs; keep compile: false / no --compile with it)"
            )
        super().compile(module, dynamic, inference)

    def synchronize(self) -> None:
        import habana_frameworks.torch.hpu as hthpu

        hthpu.synchronize()

    def peak_flops(self, device: torch.device, dtype: torch.dtype) -> float | None:
        """Intel's bf16 matrix-engine peaks by the name hpu.get_device_name() gives (GAUDI2, GAUDI3)."""
        import habana_frameworks.torch.hpu as hthpu

        if dtype != torch.bfloat16:
            return None
        return peak_by_name(hthpu.get_device_name(), {"GAUDI3": 1835e12, "GAUDI2": 432e12})


@hookimpl
def mixtral_register_backends(register) -> None:
    register(
        HPUBackend(
            name="hpu",
            device_type="hpu",
            dist_backend="hccl",
            capabilities=Capabilities(
                dynamic_shapes=False,
                preferred_dispatcher="capacity_bins",
                compile_backend="hpu_backend",  # registered by habana_frameworks
                fused_ops=("FusedSDPA", "FusedRMSNorm", "RotaryPosEmbeddingHelperV1"),
                auto_priority=30,
            ),
            # 21 of 24 x 100 GbE RoCE ports inside the node, 3 out of it
            planner_devices=(Device("gaudi2", "Intel Gaudi 2 96 GB", "hpu", 96, 432, 0.40, 230, 33, 8, 8),),
            install_hint="install Intel Gaudi's PyTorch stack (habana-torch-plugin) from its software release",
        )
    )
