"""The CUDA backend: SDPA (flash / memory-efficient) attention, torch._grouped_mm experts, NCCL."""

from __future__ import annotations

import torch

from mixtral.backend import Availability, Backend, Capabilities, Ops, hookimpl
from mixtral.kernels import native


class CUDABackend(Backend):
    def probe(self) -> Availability:
        if torch.version.cuda is None:
            return Availability(False, f"torch {torch.__version__} was built without CUDA; {self.install_hint}")
        if not torch.cuda.is_available():
            return Availability(False, "torch has CUDA but no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        return Availability(True)

    def build_ops(self) -> Ops:
        return Ops.reference(attention=native.attention, grouped_mm=native.grouped_mm, rms_norm=native.rms_norm)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_stats(self) -> dict[str, int]:
        return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}


@hookimpl
def mixtral_register_backends(register) -> None:
    register(CUDABackend(name="cuda", device_type="cuda", dist_backend="nccl",
                         capabilities=Capabilities(dynamic_shapes=True, preferred_dispatcher="dropless"),
                         install_hint="install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128)"))
