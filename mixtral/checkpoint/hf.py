"""HF Mixtral directories in and out: config.json plus safetensors (one file or shards with an index).

Both tensor layouts load with no conversion step: the original per-expert names
(`block_sparse_moe.experts.J.w1/w2/w3`) and the fused ones transformers 5 keeps in memory
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Saves use the original names, which every
transformers version reads. Tensors are read one at a time, so loading holds one copy of the model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mixtral.backend import Backend, Ops, get_backend
from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.rope import rope_tables
from mixtral.model.transformer import parameter_shapes

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old exports saved; recomputed here

Index = tuple  # an index into one of our parameters: () for all of it, (j, slice) for a piece


def hf_layout(name: str, shape: torch.Size) -> list[tuple[str, Index]]:
    """The original HF tensors that make up our parameter `name`, each with its index into it."""
    prefix = "" if name == "lm_head.weight" else "model."
    base = prefix + name.replace(".mlp.", ".block_sparse_moe.")
    if name.endswith(".experts.gate_up_proj"):
        base, ffn = base.removesuffix("gate_up_proj"), shape[1] // 2
        layout = []
        for j in range(shape[0]):  # gate_up_proj[j] = [w1; w3]
            layout += [(f"{base}{j}.w1.weight", (j, slice(0, ffn))), (f"{base}{j}.w3.weight", (j, slice(ffn, None)))]
        return layout
    if name.endswith(".experts.down_proj"):
        base = base.removesuffix("down_proj")
        return [(f"{base}{j}.w2.weight", (j,)) for j in range(shape[0])]
    return [(base, ())]


def model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MixtralError(
            f"{path}: model directory not found; pass a directory holding an HF Mixtral "
            f"checkpoint ({CONFIG} and *.safetensors)"
        )
    return path


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF Mixtral directory, from its config.json."""
    return ModelConfig.from_json(model_dir(path) / CONFIG)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: the shards its index names, or model.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise MixtralError(
                f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc}); "
                f"download or save the checkpoint again"
            ) from None
        for name in files:
            if not (path / name).is_file():
                raise MixtralError(
                    f"{index}: shard '{name}' is missing from {path}; download it again "
                    f"(every shard the index lists is needed)"
                )
        return [path / name for name in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise MixtralError(
        f"{path}: neither {SINGLE} nor {INDEX} is here; an HF Mixtral directory needs its "
        f"safetensors weights (pickled .bin weights are never read)"
    )


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SAFETENSORS_NAMES = {torch_name: name for name, torch_name in SAFETENSORS_DTYPES.items()}


@contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """safe_open, closed after each use so that no file stays mapped (memory stays one tensor)."""
    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise MixtralError(
            f"{file}: not a readable safetensors file ({exc}); it is truncated or corrupt: download or save it again"
        ) from None


class HFSource:
    """Our parameters from an HF directory, each assembled from its safetensors pieces when asked for."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None) -> None:
        self.path = model_dir(path)
        self.config = config or read_hf_config(self.path)
        self.shapes = parameter_shapes(self.config)
        wanted = {key: (name, index) for name, shape in self.shapes.items() for key, index in hf_layout(name, shape)}
        self.pieces: dict[str, list[tuple[Path, str, tuple]]] = {name: [] for name in self.shapes}
        self.stored: dict[str, tuple[Path, tuple[int, ...]]] = {}  # every HF tensor read, with its file and shape
        found: set[str] = set()
        dtypes: dict[str, str] = {}
        for file in weight_files(self.path):
            with open_safetensors(file) as handle:
                header = [(key, handle.get_slice(key)) for key in handle.keys()]
                header = [(key, torch.Size(s.get_shape()), s.get_dtype()) for key, s in header]
            for key, shape, dtype in header:
                if key in wanted:
                    (name, index), covers = wanted[key], [key]
                elif key.removeprefix("model.") in self.shapes:  # transformers 5's fused names
                    name, index = key.removeprefix("model."), ()
                    covers = [k for k, _ in hf_layout(name, self.shapes[name])]
                elif key.endswith(IGNORED_SUFFIXES) or (key == "lm_head.weight" and self.config.tie_word_embeddings):
                    continue
                else:
                    raise MixtralError(
                        f"{file}: unexpected tensor '{key}'; the weights do not match {CONFIG} "
                        f"(another layer or expert count?): use the matching config"
                    )
                expected = torch.empty(self.shapes[name], device="meta")[index].shape
                if shape != expected:
                    raise MixtralError(
                        f"{file}: tensor '{key}' has shape {list(shape)} but {CONFIG} implies "
                        f"{list(expected)}; the weights do not match the config: use the config.json "
                        f"saved with these weights"
                    )
                self.pieces[name].append((file, key, index))
                self.stored[key] = (file, tuple(shape))
                found.update(covers)
                dtypes[name] = dtype
        missing = [key for key in wanted if key not in found]
        if missing:
            raise MixtralError(
                f"{self.path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all); the "
                f"checkpoint is incomplete or saved for another config: download or save it again"
            )
        self.dtype = getattr(torch, SAFETENSORS_DTYPES.get(dtypes["embed_tokens.weight"], "float32"))

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        out = None
        for file, key, index in self.pieces[name]:
            part: tuple = ()
            if expert is not None:
                if index == ():
                    part = (slice(expert, expert + 1),)
                elif index[0] != expert:
                    continue
                else:
                    index = (0, *index[1:])
            with open_safetensors(file) as handle:
                tensor = handle.get_slice(key)[part] if part else handle.get_tensor(key)
            if out is None:
                out = torch.empty(shape if expert is None else (1, *shape[1:]), dtype=tensor.dtype)
            out[index].copy_(tensor)
        return out

    def read_box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """The box of parameter `name`, each HF tensor that overlaps it sliced in the file (get_slice)."""
        out = None
        for file, key, index in self.pieces[name]:
            region, kept = _region(self.shapes[name], index)
            overlap = tuple(slice(max(b.start, r.start), min(b.stop, r.stop)) for b, r in zip(box, region))
            if any(o.start >= o.stop for o in overlap):
                continue
            stored = tuple(slice(o.start - r.start, o.stop - r.start) for o, r, k in zip(overlap, region, kept) if k)
            with open_safetensors(file) as handle:
                tensor = handle.get_slice(key)[stored]
            if out is None:
                out = torch.empty([b.stop - b.start for b in box], dtype=tensor.dtype)
            out[tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, box))] = tensor.reshape(
                [o.stop - o.start for o in overlap]
            )
        return out


def _region(shape: torch.Size, index: Index) -> tuple[tuple[slice, ...], tuple[bool, ...]]:
    """Where an HF tensor (our parameter's [index]) lies in the parameter, and which dims it keeps (an integer
    index, the expert, drops its dim)."""
    region, kept = [], []
    for dim, size in enumerate(shape):
        part = index[dim] if dim < len(index) else slice(None)
        if isinstance(part, int):
            region.append(slice(part, part + 1))
        else:
            start, stop, _ = part.indices(size)
            region.append(slice(start, stop))
        kept.append(not isinstance(part, int))
    return tuple(region), tuple(kept)


def load_hf_state_dict(
    path: str | Path, config: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Our parameters from an HF directory, shape-checked against config; dtype None keeps the file's."""
    source = HFSource(path, config)
    return {name: source.read(name).to(dtype=dtype or source.dtype, device=device) for name in source.shapes}


def load_hf_model(
    path: str | Path,
    backend: Backend | Ops | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    moe: MoEConfig | None = None,
) -> Mixtral:
    """A ready Mixtral (eval mode) from an HF directory; built on the meta device, so weights exist once."""
    config = read_hf_config(path)
    return assemble_model(config, load_hf_state_dict(path, config, dtype=dtype, device=device), backend, device, moe)


def assemble_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    backend: Backend | Ops | str | None = None,
    device: torch.device | str = "cpu",
    moe: MoEConfig | None = None,
) -> Mixtral:
    """A ready Mixtral (eval mode) around state's tensors (assigned, not copied: weights exist once)."""
    with torch.device("meta"):
        model = Mixtral(config, get_backend(backend) if isinstance(backend, str) else backend, moe)
    model.load_state_dict(state, strict=False, assign=True)  # every parameter (checked by sources); buffers below
    model.rope_cos, model.rope_sin = rope_tables(
        config.head_dim, config.max_position_embeddings, config.rope_theta, device=torch.device(device)
    )
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:  # routing state (capacity bins, expert bias): starts at zero, not in HF files
                setattr(module, name, torch.zeros_like(buffer, device=device))
    return model.eval()


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each under max_bytes (a larger tensor gets its own shard)."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary sibling of path to fill; on success it replaces path, on failure path is untouched."""
    if path.exists() and not path.is_dir():
        raise MixtralError(f"{path}: exists and is not a directory; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        old = tmp.with_name(tmp.name + ".old")
        if path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old.exists():
                old.rename(path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_hf(
    model: Mixtral,
    path: str | Path,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | Path | None = None,
) -> None:
    """Write model as an HF directory (original tensor names, shards + index when large, config.json) atomically."""
    state = {name: p.detach() for name, p in model.named_parameters()}  # weights only: no routing state

    def read(name: str, expert: int | None = None) -> torch.Tensor:
        return state[name] if expert is None else state[name][expert : expert + 1]

    write_hf(
        path,
        model.config,
        {name: t.shape for name, t in state.items()},
        read,
        dtype or model.embed_tokens.weight.dtype,
        max_shard_bytes,
        tokenizer_path,
    )


def write_hf(
    path: str | Path,
    config: ModelConfig,
    shapes: dict[str, torch.Size],
    read: Callable[[str, int | None], torch.Tensor],
    dtype: torch.dtype,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_path: str | Path | None = None,
    on_write: Callable[[int], None] | None = None,
) -> None:
    """Write an HF directory atomically from read(name, expert) (a parameter, or one expert of a stack [1, ...]):
    each safetensors file is streamed tensor by tensor, so memory holds one expert's weight, never a shard."""
    path = Path(path)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise MixtralError(f"{tokenizer_path}: tokenizer file not found; pass the model's tokenizer.model")
    read = functools.lru_cache(maxsize=1)(read)  # w1 and w3 of an expert come from one read of its gate_up
    layout = [(hf, name, index) for name, shape in shapes.items() for hf, index in hf_layout(name, shape)]
    piece_shapes = [torch.empty(shapes[name], device="meta")[index].shape for _, name, index in layout]
    sizes = [math.prod(shape) * dtype.itemsize for shape in piece_shapes]
    shards = plan_shards(sizes, max_shard_bytes)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with atomic_directory(path) as tmp:
        weight_map = {}
        for file, shard in zip(names, shards):
            pieces = [(layout[i][0], piece_shapes[i], _piece_reader(read, *layout[i][1:])) for i in shard]
            write_safetensors(tmp / file, pieces, dtype, on_write)
            weight_map.update({layout[i][0]: file for i in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        config_json = config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / CONFIG).write_text(json.dumps(config_json, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)


def _piece_reader(
    read: Callable[[str, int | None], torch.Tensor], name: str, index: Index
) -> Callable[[], torch.Tensor]:
    """A reader of one HF tensor: index () is the whole parameter, (j, ...) a part of expert j."""
    if not index:
        return lambda: read(name, None)
    return lambda: read(name, index[0])[(0, *index[1:])]


def write_safetensors(
    file: Path,
    pieces: list[tuple[str, torch.Size, Callable[[], torch.Tensor]]],
    dtype: torch.dtype,
    on_write: Callable[[int], None] | None = None,
) -> None:
    """A safetensors file (the header first, every tensor's place known from its shape) written one tensor at a
    time: (name, shape, read) per tensor, each read only when its bytes are written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in pieces:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_NAMES[str(dtype).removeprefix("torch.")],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, shape, read in pieces:
            tensor = read().to(device="cpu", dtype=dtype).contiguous()
            if tensor.shape != shape:
                raise MixtralError(f"{file}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")
            handle.write(tensor.view(torch.uint8).numpy())
            if on_write:
                on_write(tensor.numel() * dtype.itemsize)
