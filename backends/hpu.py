"""The Intel Gaudi backend (habana_frameworks): imported lazily, HCCL collectives, capacity bins by default."""

from __future__ import annotations

from mixtral.backend import Availability, Backend, Capabilities, hookimpl, module_available


class HPUBackend(Backend):
    def probe(self) -> Availability:
        found = module_available("habana_frameworks.torch", self.install_hint)
        if not found.ok:
            return found
        import habana_frameworks.torch.hpu as hthpu

        if not hthpu.is_available():
            return Availability(False, "habana_frameworks is installed but no Gaudi device is visible")
        return Availability(True)


@hookimpl
def mixtral_register_backends(register) -> None:
    register(HPUBackend(name="hpu", device_type="hpu", dist_backend="hccl",
                        capabilities=Capabilities(dynamic_shapes=False, preferred_dispatcher="capacity_bins"),
                        install_hint="install Intel Gaudi's PyTorch stack (habana-torch-plugin) from the Intel Gaudi software release"))
