"""The TPU / XLA backend (torch_xla SPMD): imported lazily; static shapes, so capacity dispatch.

torch_xla runs in SPMD mode from the first device request on (it must be switched on before any XLA
tensor exists): one program for every device, sharded by annotations (mixtral.parallel.spmd).
Experts run as one batched matmul over the capacity dispatcher's static [E, C, H] rows (MLPerf uses
capacity factor 1.25: `moe: {dispatcher: capacity, capacity_factor: 1.25}`). Attention is SDPA (torch_xla
decomposes it to plain HLO, grouped KV heads included); the other ops are the plain-torch reference.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch
from torch import nn

from mixtral.backend import Availability, Backend, Capabilities, Device, Ops, hookimpl, module_available, peak_by_name
from mixtral.errors import MixtralError
from mixtral.kernels import blocked_cross_entropy, native
from mixtral.parallel import spmd


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Static-shape grouped GEMM for the variable row layout: each group's product masked to its rows.

    G times the FLOPs of a true grouped GEMM: only the dropless / unpadded layouts reach it; the
    default capacity dispatcher hands the experts [E, C, H] and they run one torch.bmm instead.
    """
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for g in range(w.shape[0]):
        out = out + torch.where((rows >= starts[g]) & (rows < offs[g]), x @ w[g], 0)
    return out


def enable_spmd() -> None:
    """Switch torch_xla to SPMD mode; must run before the first XLA tensor exists (else torch_xla crashes)."""
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()


def build_mesh(mesh_shape: Mapping[str, int]):
    """An xs.Mesh over every device with the requested axis sizes (their product must be the device count)."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    names, sizes = spmd.mesh_axes(mesh_shape)
    devices = xr.global_runtime_device_count()
    if math.prod(sizes) != devices:
        raise MixtralError(
            f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices but torch_xla sees "
            f"{devices}; on the CPU set CPU_NUM_DEVICES={math.prod(sizes)} (XLA_FLAGS device counts "
            f"are ignored by torch_xla)"
        )
    return xs.Mesh(np.arange(devices), sizes, names)


def shard(model: nn.Module, mesh) -> nn.Module:
    """Mark every parameter of a model already on the XLA device by spmd.param_spec, and each batch of tokens by
    spmd.batch_spec; with a tensor axis the experts' gate/up rows are stored interleaved first."""
    import torch_xla.distributed.spmd as xs

    expert_axis = "expert" in mesh.axis_names
    tensor = mesh.shape()["tensor"]
    if tensor > 1:
        for layer in model.layers:
            spmd.use_interleaved_experts(layer.mlp.experts, tensor)
    for name, param in model.named_parameters():
        spec = spmd.param_spec(name, expert_axis)
        if spec is not None:
            xs.mark_sharding(param, mesh, spec)

    def shard_tokens(_: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else kwargs["tokens"]
        if tokens.dim() == 2:
            xs.mark_sharding(tokens, mesh, spmd.batch_spec(expert_axis))

    model.register_forward_pre_hook(shard_tokens, with_kwargs=True)
    return model


class XLABackend(Backend):
    def probe(self) -> Availability:
        return module_available("torch_xla", self.install_hint)

    def build_ops(self) -> Ops:
        return Ops.reference(
            attention=native.attention, grouped_mm=grouped_mm, cross_entropy=blocked_cross_entropy.cross_entropy
        )

    def device(self, index: int = 0) -> torch.device:
        enable_spmd()
        return torch.device("xla", index)

    def mark_step(self) -> None:
        import torch_xla

        torch_xla.sync()

    def peak_flops(self, device: torch.device, dtype: torch.dtype) -> float | None:
        """Google's bf16 peak per chip from the TPU VM's accelerator type (TPU_ACCELERATOR_TYPE, e.g. v5p-128)."""
        if dtype != torch.bfloat16:
            return None
        return peak_by_name(
            os.environ.get("TPU_ACCELERATOR_TYPE", ""),
            {"v6e": 918e12, "v5p": 459e12, "v5litepod": 197e12, "v5e": 197e12, "v4": 275e12},
        )

    def synchronize(self) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        torch_xla.sync()
        xm.wait_device_ops()

    def parallelize(self, model: nn.Module, mesh_shape: Mapping[str, int]) -> nn.Module:
        """Move a CPU (or XLA) model to the XLA device and shard it on a mesh, e.g. {"fsdp": 2, "tensor": 2}; a
        model for a tensor axis > 1 is built with layout=spmd.spmd_layout(mesh_shape)."""
        device = self.device()
        return shard(model.to(device), build_mesh(mesh_shape))


@hookimpl
def mixtral_register_backends(register) -> None:
    register(
        XLABackend(
            name="xla",
            device_type="xla",
            dist_backend="xla",
            capabilities=Capabilities(
                dynamic_shapes=False,
                spmd=True,
                preferred_dispatcher="capacity",
                compile_backend=None,
                auto_priority=40,
                inference_tensors=False,
            ),
            # a 3D-torus ICI over the pod, DCN between pods
            planner_devices=(Device("v5p", "Google TPU v5p 95 GB", "xla", 95, 459, 0.55, 180, 25, 8960, 4),),
            install_hint="pip install 'mixtral-run[xla]' (torch_xla 2.9 with torch 2.9)",
        )
    )
