"""Native checkpoints: a torch.distributed.checkpoint (DCP) directory plus `manifest.json`.

Any parallel layout saves and any other loads: DCP records every tensor by its global shape and the
chunks each rank wrote, and a load reads whatever chunks each rank's (DTensor) shards overlap. Saves
are written into a hidden sibling directory and renamed into place once complete; in a checkpoints
root, `latest` (a symlink swapped with os.replace) then moves to the new step, so a crash at any
moment leaves `latest` loadable. Reading never unpickles arbitrary objects: DCP's `.metadata` goes
through an allow-list unpickler and stored objects through torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._nested_dict import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mixtral.config import ModelConfig
from mixtral.errors import MixtralError
from mixtral.model.linear import int8_scale_name
from mixtral.model.transformer import parameter_shapes

FORMAT = "mixtral-native"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d{8})")
ARCHITECTURE = "MixtralForCausalLM"

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of a piece of a checkpoint tensor
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled"  # DCP's note on every save/load without a process group


def whole(shape: Iterable[int]) -> Box:
    shape = tuple(shape)
    return (0,) * len(shape), shape


# --- reading DCP directories without unpickling arbitrary objects --------------------------------

_ALLOWED_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", name): None
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        # megatron-core keeps every rank's save plan in the metadata (all_local_plans), to reuse it on the next save
        ("torch.distributed.checkpoint.planner", name): None
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): None,
        ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"): None,
        ("torch.serialization", "_get_layout"): None,
        ("torch", "Size"): None,
        ("pathlib", "PosixPath"): None,
        ("pathlib", "PurePosixPath"): None,
        ("pathlib", "WindowsPath"): None,
        ("collections", "OrderedDict"): None,
        # megatron-core >= 0.15 pickles its own subclasses of DCP's classes; plain ones hold the same fields
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): Metadata,
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: resolve only DCP's own record types, torch.Size and dtypes."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)] or super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise MixtralError(
            f"{self.source}: refers to '{module}.{name}', which a checkpoint's metadata never "
            f"needs; it was not loaded (only DCP record types are). Use a checkpoint from a "
            f"trusted source, written by torch.distributed.checkpoint"
        )


def read_dcp_metadata(path: Path) -> Metadata:
    """The DCP metadata of a checkpoint directory, through the allow-list unpickler."""
    file = Path(path) / DCP_METADATA
    if not file.is_file():
        raise MixtralError(
            f"{path}: no {DCP_METADATA} file; the checkpoint is incomplete (a save that did not "
            f"finish) or not a torch.distributed.checkpoint directory"
        )
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle, file).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise MixtralError(
            f"{file}: unreadable checkpoint metadata ({type(exc).__name__}: {exc}); the file "
            f"is truncated or corrupt: save or copy the checkpoint again"
        ) from None
    if not isinstance(metadata, Metadata):
        raise MixtralError(f"{file}: holds a {type(metadata).__name__}, not DCP metadata; not a checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata load is the allow-list unpickler (tensors already use weights_only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values load with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _BoxLoadPlanner(_LoadPlanner):
    """Reads a flat {key: BoxTarget} (DCP's own set-up would replace objects it does not know by None)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.mappings = {}
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        target = self.state_dict[index.fqn]
        return target.tensors[target.offsets.index(tuple(index.offset))]


class _SavePlanner(DefaultSavePlanner):
    """LazyTensor values are produced box by box, while the writer writes them (streaming saves)."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, LazyTensor):
            return obj.produce(tuple(index.offset))
        return super().lookup_object(index)


@dataclass
class LazyTensor:
    """A checkpoint tensor of global `shape` written as boxes; make(box) builds one box only when DCP
    writes it, so a conversion holds one box at a time."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    boxes: list[Box]
    make: Callable[[Box], torch.Tensor]
    on_write: Callable[[int], None] | None = None  # progress: called with each box's byte count

    def size(self) -> torch.Size:
        return torch.Size(self.shape)

    def produce(self, offsets: tuple[int, ...]) -> torch.Tensor:
        box = next(b for b in self.boxes if b[0] == offsets)
        tensor = self.make(box).to(self.dtype).contiguous()
        if tuple(tensor.shape) != box[1]:
            raise AssertionError(f"box {box} produced shape {tuple(tensor.shape)}")
        if self.on_write:
            self.on_write(tensor.numel() * tensor.element_size())
        return tensor

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(off)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(off), torch.Size(sizes)),
                    properties=properties,
                    size=self.size(),
                ),
            )
            for off, sizes in self.boxes
        ]


@dataclass
class BoxTarget:
    """Boxes of one checkpoint tensor to read, each into its own tensor (any chunking on disk)."""

    shape: tuple[int, ...]
    boxes: list[Box]
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def offsets(self) -> list[tuple[int, ...]]:
        return [off for off, _ in self.boxes]

    def size(self) -> torch.Size:
        return torch.Size(self.shape)

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(off), torch.Size(sizes)) for off, sizes in self.boxes]


def _unwrap_failure(exc: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException, else exc itself."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return next(iter(exc.failures.values()))[0]
    return exc


def _dcp_load(
    state: dict[str, Any], path: Path, planner: DefaultLoadPlanner | None = None, local: bool = False
) -> None:
    """dcp.load; local reads on this rank alone (no collective), so ranks may read different tensors."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.load(state, storage_reader=SafeReader(path), planner=planner or _LoadPlanner(), no_dist=local)
    except (Exception, CheckpointException) as exc:  # DCP wraps every rank's failure; report it in one line
        cause = _unwrap_failure(exc)
        if isinstance(cause, MixtralError):
            raise cause from None
        reason = str(cause).split(". ")[0].splitlines()[0][:200] if str(cause) else ""
        raise MixtralError(
            f"{path}: reading the checkpoint failed ({type(cause).__name__}: {reason}); a data "
            f"file is truncated, corrupt or missing: save or copy the checkpoint again"
        ) from None


def _overlap(a: Box, b: Box) -> int:
    """Number of elements two boxes share."""
    return math.prod(max(0, min(oa + sa, ob + sb) - max(oa, ob)) for oa, sa, ob, sb in zip(*a, *b))


def read_boxes(
    path: Path, requests: dict[str, list[Box]], metadata: Metadata | None = None
) -> dict[str, list[torch.Tensor]]:
    """Read boxes of tensors (by DCP key) from a checkpoint directory, in the stored dtype."""
    metadata = metadata or read_dcp_metadata(path)
    state: dict[str, Any] = {}
    for key, boxes in requests.items():
        md = metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise MixtralError(
                f"{path}: tensor '{key}' is not in the checkpoint; it was saved for another model or is incomplete"
            )
        for box in boxes:
            if sum(_overlap(box, (tuple(c.offsets), tuple(c.sizes))) for c in md.chunks) != math.prod(box[1]):
                raise MixtralError(
                    f"{path}: tensor '{key}' is not completely stored (its chunks do not cover "
                    f"{box}); the checkpoint is incomplete or corrupt: save or copy it again"
                )
        state[key] = BoxTarget(
            tuple(md.size), boxes, [torch.empty(sizes, dtype=md.properties.dtype) for _, sizes in boxes]
        )
    _dcp_load(state, path, _BoxLoadPlanner(), local=True)
    return {key: target.tensors for key, target in state.items()}


def dcp_save(state: dict[str, Any], path: Path, file_per_item: bool = False) -> None:
    """dcp.save with the streaming planner; file_per_item bounds memory to one box (DCP keeps a file's
    tensors until the file is written)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.save(
            state, storage_writer=FileSystemWriter(path, single_file_per_rank=not file_per_item), planner=_SavePlanner()
        )


# --- manifest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    layout: dict[str, int]
    step: int
    dtype: str
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": ARCHITECTURE,
            "model_config": self.config.to_hf_dict(),
            "layout": self.layout,
            "step": self.step,
            "dtype": self.dtype,
            "extra": self.extra,
        }


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a native checkpoint directory; unknown versions and other models are refused."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise MixtralError(f"{path}: no {MANIFEST}; not a native mixtral-run checkpoint (or an unfinished one)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MixtralError(f"{file}: not valid JSON ({exc}); the checkpoint is corrupt: save it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MixtralError(
            f"{file}: 'format' is {data.get('format') if isinstance(data, dict) else None!r}, "
            f"not '{FORMAT}'; this is not a native mixtral-run checkpoint manifest"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise MixtralError(
            f"{file}: format_version {version!r} is not supported (this mixtral-run reads version "
            f"{FORMAT_VERSION}); use the mixtral-run version that wrote it, or convert it there"
        )
    if data.get("architecture") != ARCHITECTURE:
        raise MixtralError(
            f"{file}: architecture is {data.get('architecture')!r}, not '{ARCHITECTURE}'; "
            f"mixtral-run only loads Mixtral checkpoints"
        )
    config = ModelConfig.from_dict(data.get("model_config") or {}, source=f"{file} (model_config)")
    return Manifest(
        config,
        dict(data.get("layout") or {}),
        int(data.get("step", 0)),
        str(data.get("dtype", "")),
        dict(data.get("extra") or {}),
    )


def _write_json(file: Path, data: dict[str, Any]) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, file)


# --- atomic publication --------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """Where a save of path is written before it is published (hidden, so never mistaken for a checkpoint)."""
    return path.with_name(f".{path.name}.tmp")


def publish(tmp: Path, path: Path) -> None:
    """Rename the complete directory tmp to path; a directory already at path is replaced, then deleted."""
    _fsync_dir(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def remove_stale_temporaries(root: Path) -> None:
    """Hidden directories that killed saves left behind (never published, so never read)."""
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".") and (entry.name.endswith(".tmp") or ".old-" in entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()


def _dtype_name(state: dict[str, Any]) -> str:
    dtypes = sorted(
        {
            str(getattr(v, "dtype", "")).removeprefix("torch.")
            for v in state.values()
            if getattr(v, "dtype", None) is not None and v.dtype.is_floating_point
        }
    )
    return dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)


def save_native(
    path: str | Path,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    *,
    config: ModelConfig,
    step: int = 0,
    layout: dict[str, int] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    file_per_item: bool = False,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a native checkpoint at path; collective when a process group is up (each rank passes its shards).

    model_state is get_model_state_dict(model) (tensors, DTensors; LazyTensors for streaming conversions),
    optimizer_state get_optimizer_state_dict(model, optimizer). Written into `.<name>.tmp`, then renamed;
    add_files(tmp) runs on every rank before the DCP save, so side files are published with the tensors.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    if path.exists() and not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
        raise MixtralError(f"{path}: exists and is not a native checkpoint; choose another output path")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state: dict[str, Any] = {"model": model_state}
    if optimizer_state is not None:
        state["optimizer"] = optimizer_state
    try:
        if add_files is not None:
            add_files(tmp)
        dcp_save(state, tmp, file_per_item)  # collective: every rank's side files exist once it returns
        if _rank() == 0:
            manifest = Manifest(
                config,
                dict(layout or {"tp": 1, "pp": 1, "ep": 1}),
                step,
                _dtype_name(model_state),
                dict(manifest_extra or {}),
            )
            _write_json(tmp / MANIFEST, manifest.to_json())
            publish(tmp, path)
    except BaseException:
        if _rank() == 0:  # never published, so never read; removed now rather than by the next save
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return path


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def published(root: str | Path) -> Path | None:
    """The step directory `latest` names in a checkpoints root, or None when nothing is published yet."""
    link = Path(root) / LATEST
    return link.resolve() if (link / MANIFEST).is_file() else None


def _publish_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def save_native_step(
    root: str | Path,
    step: int,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    *,
    config: ModelConfig,
    layout: dict[str, int] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    keep_last: int = 0,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Save step into root/step_XXXXXXXX, then swap root/latest to it, then keep only the last keep_last.

    A step that `latest` already names is not rewritten (the published directory is never replaced).
    """
    root = Path(root)
    final = root / step_name(step)
    if published(root) == final.resolve():
        return final
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        if final.exists():  # written by a run that died before publishing it: never read
            shutil.rmtree(final)
    _barrier()
    save_native(
        final,
        model_state,
        optimizer_state,
        config=config,
        step=step,
        layout=layout,
        manifest_extra=manifest_extra,
        add_files=add_files,
    )
    if _rank() == 0:
        _publish_latest(root, final.name)
        if keep_last > 0:
            steps = sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir())
            for old in steps[:-keep_last]:
                if old.resolve() != final.resolve():
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_native(path: str | Path) -> Path:
    """A native checkpoint directory, or the one `latest` names in a checkpoints root."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).exists():
        target = published(path)
        if target is None:
            raise MixtralError(
                f"{path / LATEST}: points to {os.readlink(path / LATEST)!r}, which holds no "
                f"{MANIFEST}; point {LATEST} at a complete step directory"
            )
        return target
    if not path.exists():
        raise MixtralError(f"{path}: no such checkpoint directory")
    raise MixtralError(
        f"{path}: neither {MANIFEST} nor a '{LATEST}' link is here; pass a native checkpoint "
        f"directory or a checkpoints root"
    )


# --- loading into a model ------------------------------------------------------------------------

_WRAPPER_TOKENS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean(name: str) -> str:
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def _check_config(manifest: Manifest, config: ModelConfig, file: Path) -> None:
    ours, theirs = config.to_hf_dict(), manifest.config.to_hf_dict()
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {ours[k]!r}" for k in differ[:4])
        raise MixtralError(
            f"{file}: the checkpoint's model config differs from the model's ({shown}); build "
            f"the model from the checkpoint's config (read_manifest(path).config)"
        )


def load_native(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, views: Any = None
) -> Manifest:
    """Load a native checkpoint into model (and optimizer) in whatever layout they are sharded now.

    Collective when a process group is up; a pipeline stage loads only the layers it holds (global names).
    Routing-state buffers the checkpoint lacks (an HF conversion) keep their values; a missing parameter
    is an error, and so is a tensor of a module the model has that the model lacks (another moe recipe).
    views maps the state dicts to what DCP reads into, and its restore() runs after the read
    (mixtral.parallel.expert_parallel.ExpertCheckpointViews: expert stacks under their global indices).
    """
    path = resolve_native(path)
    manifest = read_manifest(path)
    if hasattr(model, "config"):
        _check_config(manifest, model.config, path / MANIFEST)
    stored = set(read_dcp_metadata(path).state_dict_metadata)
    state = get_model_state_dict(model)
    params = {_clean(name) for name, _ in model.named_parameters()}
    missing = [k for k in state if f"model.{k}" not in stored]
    missing_params = [k for k in missing if _clean(k) in params]
    if missing_params:
        raise MixtralError(
            f"{path}: parameter '{missing_params[0]}' is not in the checkpoint "
            f"({len(missing_params)} missing); it was saved for another model"
        )
    modules = {_clean(name) for name, _ in model.named_modules()}
    unexpected = sorted(
        key
        for key in (k[len("model.") :] for k in stored if k.startswith("model."))
        if key not in state and key.rpartition(".")[0] in modules
    )
    if unexpected:
        raise MixtralError(
            f"{path}: the checkpoint holds '{unexpected[0]}', which the model lacks; build the model "
            f"with the recipe it was trained with (moe.expert_bias / moe.dispatcher)"
        )
    loadable = {k: v for k, v in state.items() if k not in missing}
    to_load: dict[str, Any] = {"model": loadable}
    if optimizer is not None:
        if not any(k.startswith("optimizer.") for k in stored):
            raise MixtralError(
                f"{path}: holds no optimizer state (a converted or weights-only checkpoint); "
                f"resume needs a checkpoint saved by training, or start a fresh run from it"
            )
        to_load["optimizer"] = get_optimizer_state_dict(model, optimizer)
    _dcp_load({part: views(state) for part, state in to_load.items()} if views else to_load, path)
    if views is not None:
        views.restore()
    set_model_state_dict(model, state, options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, to_load["optimizer"])
    return manifest


def model_keys(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """The model tensors of a native checkpoint's DCP metadata, by our parameter name."""
    return {
        k[len("model.") :]: md
        for k, md in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }


class NativeSource:
    """Our tensors, read on demand from a native checkpoint (whole, or one expert at a time)."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_native(path)
        self.config = read_manifest(self.path).config
        self.metadata = read_dcp_metadata(self.path)
        stored = model_keys(self.metadata)
        self.shapes = parameter_shapes(self.config)
        for name, shape in self.shapes.items():
            if name not in stored:
                raise MixtralError(
                    f"{self.path}: parameter '{name}' is not in the checkpoint; it is incomplete or "
                    f"its {MANIFEST} belongs to another model"
                )
            if tuple(stored[name].size) != tuple(shape):
                raise MixtralError(
                    f"{self.path}: tensor '{name}' has shape {list(stored[name].size)} but "
                    f"{MANIFEST} implies {list(shape)}; the manifest does not match the weights"
                )
        for name in list(self.shapes):  # an int8 checkpoint (convert --dtype int8): the scales of its int8 weights
            if f"{int8_scale_name(name)}" in stored:
                self.shapes[int8_scale_name(name)] = torch.Size(stored[int8_scale_name(name)].size)
        self.dtype = stored["embed_tokens.weight"].properties.dtype

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        shape = tuple(self.shapes[name])
        box = whole(shape) if expert is None else ((expert,) + (0,) * (len(shape) - 1), (1, *shape[1:]))
        return read_boxes(self.path, {f"model.{name}": [box]}, self.metadata)[f"model.{name}"][0]

    def read_box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        offsets, sizes = tuple(s.start for s in box), tuple(s.stop - s.start for s in box)
        return read_boxes(self.path, {f"model.{name}": [(offsets, sizes)]}, self.metadata)[f"model.{name}"][0]
