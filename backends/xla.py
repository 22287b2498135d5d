"""The TPU / XLA backend (torch_xla SPMD): imported lazily; static shapes, so capacity dispatch."""

from __future__ import annotations

from mixtral.backend import Availability, Backend, Capabilities, hookimpl, module_available


class XLABackend(Backend):
    def probe(self) -> Availability:
        return module_available("torch_xla", self.install_hint)


@hookimpl
def mixtral_register_backends(register) -> None:
    register(XLABackend(name="xla", device_type="xla", dist_backend="xla",
                        capabilities=Capabilities(dynamic_shapes=False, spmd=True, preferred_dispatcher="capacity"),
                        install_hint="pip install 'mixtral-run[xla]' (torch_xla 2.9 with torch 2.9)"))
