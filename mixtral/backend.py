"""The backend contract: pluggy hookspecs, the Backend object, its op table and the registry.

Backends register once through the `mixtral` entry-point group; the model copies the chosen
functions out of `Backend.ops` when it is built, so no plugin dispatch happens per call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy
import torch

from mixtral.errors import MixtralError

hookspec = pluggy.HookspecMarker("mixtral")
hookimpl = pluggy.HookimplMarker("mixtral")

DISPATCHERS = ("dropless", "capacity", "capacity_bins")


class Hookspecs:
    @hookspec
    def mixtral_register_backends(self, register: Callable[["Backend"], None]) -> None:
        """Call register(backend) once for each backend this plugin provides."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    dynamic_shapes: bool = True
    spmd: bool = False
    preferred_dispatcher: str = "dropless"
    fused_ops: tuple[str, ...] = ()  # the vendor kernels the op table uses (`mixtral-run backends`)
    compile_backend: str | None = "inductor"  # torch.compile's backend here; None: the device does not use it
    auto_priority: int = 10  # `--backend auto` takes the available backend that ranks highest
    fused_optimizer: bool = False  # torch's fused AdamW kernel runs on this device
    inference_tensors: bool = True  # torch.inference_mode works (torch_xla 2.9 rejects its tensors)


@dataclass(frozen=True)
class Device:
    """One accelerator as the planner sees it; figures are public datasheet numbers or stated assumptions."""

    name: str
    label: str
    backend: str  # the mixtral backend that drives it
    memory_gib: float  # HBM per device
    peak_tflops: float  # dense bf16
    mfu: float  # share of peak a tuned MoE run reaches (the anchors: Megatron 47%, MaxText 55%, MindSpeed 32%)
    intra_gbs: float  # GB/s per device for collectives inside a link domain (NVLink, RoCE scale-up, HCCS, ICI)
    inter_gbs: float  # GB/s per device across link domains (InfiniBand / Ethernet NICs, DCN)
    link_domain: int  # devices sharing the fast links
    per_host: int  # devices per node (host)


@dataclass(frozen=True)
class Ops:
    """The op table; each field has the signature of its namesake in mixtral.kernels.reference."""

    attention: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    router: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    grouped_mm: Callable[..., torch.Tensor]
    permute: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    unpermute: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    rope: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    cross_entropy: Callable[..., torch.Tensor]
    int8_linear: Callable[..., torch.Tensor]
    int8_grouped_mm: Callable[..., torch.Tensor]

    @classmethod
    def reference(cls, **overrides: Callable[..., Any]) -> "Ops":
        """The reference table, with some ops replaced by faster or vendor versions."""
        from mixtral.kernels import reference

        table = {name: getattr(reference, name) for name in cls.__dataclass_fields__}
        table.update(overrides)
        return cls(**table)


@dataclass
class Backend:
    """A device family: what it is, whether it is usable here, and its op table.

    Subclasses override `probe` (availability) and `build_ops` (imports vendor libraries lazily).
    """

    name: str
    device_type: str
    dist_backend: str
    capabilities: Capabilities = field(default_factory=Capabilities)
    install_hint: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # a recipe's backend_options, read by build_ops
    planner_devices: tuple[Device, ...] = ()  # the hardware it drives, for `recipe plan / validate`; first: default

    def configure(self, options: dict[str, Any]) -> "Backend":
        """A copy with a recipe's backend_options (ops built afresh); the registered instance stays as it is."""
        return dataclasses.replace(self, options=dict(options)) if options else self

    def probe(self) -> Availability:
        return Availability(True)

    def build_ops(self) -> Ops:
        return Ops.reference()

    @functools.cached_property
    def availability(self) -> Availability:
        try:
            return self.probe()
        except Exception as exc:  # a broken vendor install is "unavailable", never a crash
            return Availability(False, f"probe failed: {type(exc).__name__}: {exc}")

    @functools.cached_property
    def ops(self) -> Ops:
        return self.build_ops()

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def synchronize(self) -> None:
        """Wait for queued device work (timing, benchmarks)."""

    def peak_flops(self, device: torch.device, dtype: torch.dtype) -> float | None:
        """The device's dense matmul peak in FLOP/s for dtype (MFU's denominator), from its datasheet; None: unknown
        here, so the trainer measures it."""
        return None

    def mark_step(self) -> None:
        """End of a step for lazy-graph backends (XLA, Gaudi lazy mode); a no-op for eager ones."""

    def compile(self, module: torch.nn.Module, dynamic: bool | None = None, inference: bool = False) -> None:
        """torch.compile module in place with this device's compiler (parameter names and hooks unchanged);
        dynamic=True when its input shapes vary from call to call, inference=True for generation (the weights stay
        as they are from then on: a backend may compile them into its graphs)."""
        if self.capabilities.compile_backend is None:
            raise MixtralError(
                f"torch.compile is not supported by the {self.name} backend (it builds its own graphs); "
                f"set compile: false in the recipe, or drop --compile"
            )
        module.compile(
            backend=self.capabilities.compile_backend, dynamic=dynamic, options=self.compile_options(inference) or None
        )

    def compile_options(self, inference: bool) -> dict[str, Any]:
        """The compiler's options (inductor config keys) for training or inference graphs; none by default."""
        return {}

    def parallelize(self, model: torch.nn.Module, mesh_shape: dict[str, int]) -> torch.nn.Module:
        """SPMD backends (capabilities.spmd) shard model over every device on a named mesh; others use
        torch.distributed."""
        raise MixtralError(
            f"the {self.name} backend declares SPMD but does not implement parallelize(model, mesh_shape)"
        )

    def memory_stats(self) -> dict[str, int]:
        return {}


def module_available(module: str, hint: str) -> Availability:
    """Availability from an import probe: the reason names the missing package and how to install it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return Availability(False, f"python package '{module}' is not importable ({exc}); {hint}")
    return Availability(True)


class Registry:
    """Every registered backend, loaded from entry points once."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager("mixtral")
        self.manager.add_hookspecs(Hookspecs)
        self._backends: dict[str, Backend] | None = None

    def load_entry_points(self) -> None:
        self.manager.load_setuptools_entrypoints("mixtral")

    def register_plugin(self, plugin: object) -> None:
        """Register an in-process plugin (a module or object with hookimpls)."""
        self.manager.register(plugin)
        self._backends = None

    @property
    def backends(self) -> dict[str, Backend]:
        if self._backends is None:
            found: dict[str, Backend] = {}

            def register(backend: Backend) -> None:
                if backend.name in found:
                    raise MixtralError(f"two plugins register a backend named '{backend.name}'")
                found[backend.name] = backend

            self.manager.hook.mixtral_register_backends(register=register)
            self._backends = found
        return self._backends

    def by_priority(self) -> list[Backend]:
        """Every backend, the one `auto` prefers first (capabilities.auto_priority, then name)."""
        return sorted(self.backends.values(), key=lambda b: (-b.capabilities.auto_priority, b.name))

    def get(self, name: str = "auto") -> Backend:
        """The named backend, or the available one of highest auto priority; unusable ones fail with their reason."""
        backends = self.backends
        if name == "auto":
            for backend in self.by_priority():
                if backend.availability.ok:
                    return backend
            raise MixtralError("no backend is available; run `mixtral-run backends` to see why")
        if name not in backends:
            raise MixtralError(f"unknown backend '{name}'; registered backends: {', '.join(sorted(backends))}")
        backend = backends[name]
        if not backend.availability.ok:
            raise MixtralError(f"backend '{name}' is not available here: {backend.availability.reason}")
        return backend


@functools.cache
def registry() -> Registry:
    reg = Registry()
    reg.load_entry_points()
    return reg


def get_backend(name: str = "auto") -> Backend:
    return registry().get(name)


def add_backend_argument(parser) -> None:
    """The --backend flag every command takes."""
    parser.add_argument(
        "--backend",
        default="auto",
        help="backend name, or 'auto': the available backend of highest priority (`mixtral-run "
        "backends` lists them in that order)",
    )


def all_backends() -> Iterable[Backend]:
    """Every registered backend, in `auto`'s order."""
    return registry().by_priority()


def backend_for_device(device_type: str) -> Backend | None:
    """The registered backend of this torch device type (its shape rules, its end-of-step hook), if any."""
    return next((b for b in all_backends() if b.device_type == device_type), None)


def peak_by_name(name: str, table: dict[str, float]) -> float | None:
    """A datasheet figure for a device name: the first table key the name contains (case-insensitive)."""
    return next((flops for key, flops in table.items() if key.lower() in name.lower()), None)
