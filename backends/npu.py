"""The Huawei Ascend backend (torch_npu): imported lazily, HCCL collectives."""

from __future__ import annotations

from mixtral.backend import Availability, Backend, Capabilities, hookimpl, module_available


class NPUBackend(Backend):
    def probe(self) -> Availability:
        found = module_available("torch_npu", self.install_hint)
        if not found.ok:
            return found
        import torch

        if not torch.npu.is_available():
            return Availability(False, "torch_npu is installed but no Ascend NPU is visible (check the CANN driver)")
        return Availability(True)


@hookimpl
def mixtral_register_backends(register) -> None:
    register(NPUBackend(name="npu", device_type="npu", dist_backend="hccl",
                        capabilities=Capabilities(dynamic_shapes=True, preferred_dispatcher="dropless"),
                        install_hint="pip install 'mixtral-run[npu]' (torch_npu matching your torch and CANN)"))
