"""The CUDA backend: SDPA (flash / memory-efficient) attention, torch._grouped_mm or a Triton grouped GEMM, NCCL.

With triton importable, token permute / unpermute run as Triton kernels (routing weights fused into
unpermute) and the grouped GEMM falls back to Triton wherever torch._grouped_mm does not run.
"""

from __future__ import annotations

import importlib.util

import torch

from mixtral.backend import Availability, Backend, Capabilities, Device, Ops, hookimpl, peak_by_name
from mixtral.kernels import blocked_cross_entropy, native

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Dense (no sparsity) datasheet peaks in TFLOP/s: bf16 tensor cores, and fp32 (TF32 tensor cores when
# torch.set_float32_matmul_precision allows them, else the plain fp32 units). Longer names first: "H100 PCIe" first.
PEAK_TFLOPS = {  # name: (bf16, tf32, fp32)
    "GB200": (2500, 1250, 80),
    "B200": (2250, 1100, 80),
    "H200": (989, 494, 67),
    "H100 PCIe": (756, 378, 51),
    "H100": (989, 494, 67),
    "H800": (989, 494, 67),
    "H20": (148, 74, 44),
    "A100": (312, 156, 19.5),
    "A800": (312, 156, 19.5),
    "L40S": (362, 183, 91.6),
    "L4": (121, 60, 30.3),
    "A10G": (70, 35, 31.2),
    "A10": (125, 62.5, 31.2),
}
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
            return Availability(
                False, "torch has CUDA but no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
        return Availability(True)

    def build_ops(self) -> Ops:
        if not HAS_TRITON:
            return Ops.reference(
                attention=native.attention,
                grouped_mm=native.grouped_mm,
                rms_norm=native.rms_norm,
                cross_entropy=blocked_cross_entropy.cross_entropy,
            )
        from mixtral.kernels import triton_moe

        eager = torch.compiler.disable  # as _triton_grouped_mm
        return Ops.reference(
            attention=native.attention,
            grouped_mm=grouped_mm,
            rms_norm=native.rms_norm,
            permute=eager(triton_moe.permute),
            unpermute=eager(triton_moe.unpermute),
            router=eager(triton_moe.router),
            cross_entropy=blocked_cross_entropy.cross_entropy,
        )

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def peak_flops(self, device: torch.device, dtype: torch.dtype) -> float | None:
        peaks = peak_by_name(torch.cuda.get_device_name(device), PEAK_TFLOPS)
        if peaks is None:
            return None
        bf16, tf32, fp32 = peaks
        if dtype in (torch.bfloat16, torch.float16):
            return bf16 * 1e12
        return (fp32 if torch.get_float32_matmul_precision() == "highest" else tf32) * 1e12  # "high": TF32 matmuls

    def memory_stats(self) -> dict[str, int]:
        return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}


@hookimpl
def mixtral_register_backends(register) -> None:
    register(
        CUDABackend(
            name="cuda",
            device_type="cuda",
            dist_backend="nccl",
            capabilities=Capabilities(
                dynamic_shapes=True,
                preferred_dispatcher="dropless",
                fused_ops=TRITON_OPS if HAS_TRITON else (),
                auto_priority=50,
                fused_optimizer=True,
            ),
            # NVLink4 450 GB/s, 400 Gb/s InfiniBand per GPU
            planner_devices=(Device("h100", "NVIDIA H100 SXM 80 GB", "cuda", 80, 989, 0.45, 360, 45, 8, 8),),
            install_hint="install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128)",
        )
    )
