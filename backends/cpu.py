"""The CPU backend: SDPA attention, torch._grouped_mm experts, gloo collectives."""

from __future__ import annotations

from mixtral.backend import Backend, Capabilities, Ops, hookimpl
from mixtral.kernels import native


class CPUBackend(Backend):
    def build_ops(self) -> Ops:
        return Ops.reference(attention=native.attention, grouped_mm=native.grouped_mm, rms_norm=native.rms_norm)


@hookimpl
def mixtral_register_backends(register) -> None:
    register(CPUBackend(name="cpu", device_type="cpu", dist_backend="gloo",
                        capabilities=Capabilities(dynamic_shapes=True, preferred_dispatcher="dropless")))
