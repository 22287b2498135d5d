"""The CUDA backend: SDPA (flash / memory-efficient) attention, torch._grouped_mm or a Triton grouped GEMM, NCCL.

With triton importable, token permute / unpermute run as Triton kernels (routing weights fused into
unpermute) and the grouped GEMM falls back to Triton wherever torch._grouped_mm does not run.
"""

from __future__ import annotations

import importlib.util

import torch

from mixtral.backend import Availability, Backend, Capabilities, Ops, hookimpl
from mixtral.kernels import native

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OPS = ("triton_permute", "triton_unpermute", "triton_router", "triton_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm where it runs for this dtype and shape (bf16 on Hopper), else the Triton grouped GEMM."""
    if native.grouped_mm_runs(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    return _triton_grouped_mm(x, w, offs)


@torch.compiler.disable  # the Triton kernels run outside torch.compile graphs (not verified inside them)
def _triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    from mixtral.kernels import triton_grouped_mm

    return triton_grouped_mm.grouped_mm(x, w, offs)


class CUDABackend(Backend):
    def probe(self) -> Availability:
        if torch.version.cuda is None:
            return Availability(False, f"torch {torch.__version__} was built without CUDA; {self.install_hint}")
        if not torch.cuda.is_available():
            return Availability(False, "torch has CUDA but no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        return Availability(True)

    def build_ops(self) -> Ops:
        if not HAS_TRITON:
            return Ops.reference(attention=native.attention, grouped_mm=native.grouped_mm, rms_norm=native.rms_norm)
        from mixtral.kernels import triton_moe

        eager = torch.compiler.disable  # as _triton_grouped_mm
        return Ops.reference(attention=native.attention, grouped_mm=grouped_mm, rms_norm=native.rms_norm,
                             permute=eager(triton_moe.permute), unpermute=eager(triton_moe.unpermute),
                             router=eager(triton_moe.router))

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_stats(self) -> dict[str, int]:
        return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}


@hookimpl
def mixtral_register_backends(register) -> None:
    register(CUDABackend(name="cuda", device_type="cuda", dist_backend="nccl",
                         capabilities=Capabilities(dynamic_shapes=True, preferred_dispatcher="dropless",
                                                   fused_ops=TRITON_OPS if HAS_TRITON else ()),
                         install_hint="install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128)"))
