"""Megatron-core's torch_dist checkpoints of Mixtral (GPTModel, local or Transformer Engine layer spec), both ways.

torch_dist is plain torch.distributed.checkpoint: one DCP key per Megatron ShardedTensor key, with
every decoder layer stacked on dim 0 (homogeneous layers) and every expert on dim 1, so one
checkpoint serves every TP/PP/EP layout. Each ShardedObject (a module's `_extra_state`, the common
state) is one pickled list under its unique key. The key table is in docs/checkpoint-formats.md; it
was read off megatron-core's own code (gpt_layer_specs' local and Transformer Engine specs,
experts.SequentialMLP/TEGroupedMLP.sharded_state_dict, TransformerBlock.sharded_state_dict,
attention's per-query-group QKV split, dist_checkpointing.serialization.save for metadata.json and
the common state) and is checked against megatron-core 0.19 itself by tests/megatron.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from mixtral.checkpoint.hf import CONFIG
from mixtral.checkpoint.native import (
    _SINGLE_PROCESS_WARNING,
    Box,
    LazyTensor,
    _SavePlanner,
    publish,
    read_boxes,
    read_dcp_metadata,
    temporary_sibling,
    whole,
)
from mixtral.config import ModelConfig
from mixtral.errors import MixtralError
from mixtral.model.moe import EXPERT_SUFFIXES
from mixtral.model.transformer import parameter_shapes

METADATA = "metadata.json"
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
# megatron.core.dist_checkpointing.core.CheckpointingConfig, exactly as megatron-core 0.19's save_config writes it
CHECKPOINTING_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
# megatron-core 0.19 keeps the common (non-sharded) state in the DCP files: ShardedObject("common_state", data,
# (1,), (0,)), read back by load_common_state_dict; older ones wrote common.pt (which it still reads). Reading here
# needs neither.
COMMON_STATE = "common_state/shard_0_1"
COMMON_STATE_DATA = {"checkpoint_version": 3.0, "iteration": 0}  # what Megatron-LM's load_checkpoint reads of it

QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_PARTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
LAYER_KEYS = {  # our per-layer name -> Megatron key (stacked over layers on dim 0)
    "input_layernorm.weight": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "self_attn.o_proj.weight": "decoder.layers.self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "mlp.gate.weight": "decoder.layers.mlp.router.weight",
    "mlp.experts.gate_up_proj": FC1,  # [E, 2F, H] per layer; fc1 = [gate (w1); up (w3)], as ours
    "mlp.experts.down_proj": FC2,
}
TOP_KEYS = {
    "embed_tokens.weight": "embedding.word_embeddings.weight",
    "norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")  # Megatron may pad the vocabulary rows
PRE_MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
TE_PRE_MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"  # the TE spec keeps the pre-MLP norm its own module
ALIASES = {  # the same tensors under other layer specs (Transformer Engine spec, older local spec)
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": ("decoder.layers.input_layernorm.weight",),
    PRE_MLP_NORM: (TE_PRE_MLP_NORM,),
}
SUFFIX_OF = {key: suffix for suffix, key in LAYER_KEYS.items()}
LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
ATTENTION_MODULES = ("decoder.layers.self_attention.linear_qkv", "decoder.layers.self_attention.linear_proj")
EXPERT_MODULES = ("decoder.layers.mlp.experts.experts.linear_fc1", "decoder.layers.mlp.experts.experts.linear_fc2")


@dataclass(frozen=True)
class LayerSpec:
    """What GPTModel.sharded_state_dict() asks for under one megatron-core layer spec, beyond the local spec's
    tensors: renamed tensors, and the modules whose get_extra_state() makes an `_extra_state` ShardedObject."""

    renames: dict[str, str]  # local-spec key -> this spec's key
    layer_modules: tuple[str, ...]  # one _extra_state per layer (besides EXPERT_MODULES: one per layer and expert)
    model_modules: tuple[str, ...]  # one _extra_state for the whole model
    extra_state: Any  # what those modules' get_extra_state() returns without FP8 state


SPECS = {
    # get_gpt_layer_local_spec: ColumnParallelLinear/RowParallelLinear (attention, SequentialMLP experts) return None;
    # its norms (WrappedTorchNorm / Apex) have no extra state
    "local": LayerSpec({}, ATTENTION_MODULES, (), None),
    # get_gpt_layer_with_transformer_engine_spec: TELayerNormColumnParallelLinear, TERowParallelLinear, TENorm's RMSNorm
    # (pre-MLP and final norms) and TEGroupedMLP's grouped linears return an empty uint8 tensor without FP8 state
    "te": LayerSpec(
        {PRE_MLP_NORM: TE_PRE_MLP_NORM},
        (*ATTENTION_MODULES, "decoder.layers.pre_mlp_layernorm"),
        ("decoder.final_layernorm",),
        torch.empty(0, dtype=torch.uint8),
    ),
}

Read = Callable[[str, "int | None"], torch.Tensor]  # (our name, expert or None) -> that tensor or [1, ...] expert slice
ReadBox = Callable[[str, Box], torch.Tensor]  # (Megatron key, box) -> that box


def layer_spec(name: str) -> LayerSpec:
    """The layer spec Megatron-LM builds its GPTModel with, by the name --megatron-spec takes."""
    if name not in SPECS:
        raise MixtralError(
            f"Megatron layer spec {name!r} is unknown; choose --megatron-spec local (megatron-core's "
            f"own modules) or te (Transformer Engine, as with --moe-grouped-gemm)"
        )
    return SPECS[name]


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Megatron-LM's vocab_size_with_padding: the vocabulary rounded up to a multiple of
    make_vocab_size_divisible_by x tensor_model_parallel_size."""
    return -(-vocab_size // multiple) * multiple


def megatron_shapes(config: ModelConfig, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every Megatron key this model has (local spec names), with its global shape; vocab_rows pads the vocabulary."""
    c = config
    L, H, E, F, d = c.num_hidden_layers, c.hidden_size, c.num_local_experts, c.intermediate_size, c.head_dim
    V = c.vocab_size if vocab_rows is None else vocab_rows
    shapes = {
        "embedding.word_embeddings.weight": (V, H),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (L, H),
        QKV: (L, (c.num_attention_heads + 2 * c.num_key_value_heads) * d, H),
        "decoder.layers.self_attention.linear_proj.weight": (L, H, c.num_attention_heads * d),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (L, H),
        "decoder.layers.mlp.router.weight": (L, E, H),
        FC1: (L, E, 2 * F, H),
        FC2: (L, E, H, F),
        "decoder.final_layernorm.weight": (H,),
    }
    if not c.tie_word_embeddings:
        shapes["output_layer.weight"] = (V, H)
    return shapes


def object_key(module: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The DCP key of a module's `_extra_state`: megatron-core's ShardedObject.unique_key."""
    return f"{module}._extra_state/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


def megatron_objects(config: ModelConfig, spec: LayerSpec) -> dict[str, list[Any]]:
    """Every ShardedObject spec's GPTModel asks for, plus the common state, as torch_dist stores them: the list
    of the shards' data (one here) under the object's unique key."""
    L, E = config.num_hidden_layers, config.num_local_experts
    objects = {COMMON_STATE: [dict(COMMON_STATE_DATA)]}
    for module in spec.layer_modules:
        objects |= {object_key(module, (layer,), (L,)): [spec.extra_state] for layer in range(L)}
    for module in EXPERT_MODULES:
        objects |= {
            object_key(module, (layer, expert), (L, E)): [spec.extra_state] for layer in range(L) for expert in range(E)
        }
    for module in spec.model_modules:
        objects[object_key(module, (0,), (1,))] = [spec.extra_state]
    return objects


def megatron_boxes(key: str, shape: tuple[int, ...]) -> list[Box]:
    """How a key is written: one box per layer, per (layer, expert) for experts, else whole (as Megatron does)."""
    if key in (FC1, FC2):
        return [((layer, expert, 0, 0), (1, 1, *shape[2:])) for layer in range(shape[0]) for expert in range(shape[1])]
    if key.startswith("decoder.layers."):
        return [((layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])) for layer in range(shape[0])]
    return [whole(shape)]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Megatron's linear_qkv rows: for each kv group, its query heads, then its key head, then its value head."""
    groups, hidden = config.num_key_value_heads, q.shape[-1]
    parts = [t.reshape(groups, -1, hidden) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv: (q_proj, k_proj, v_proj) weights."""
    groups, d, hidden = config.num_key_value_heads, config.head_dim, qkv.shape[-1]
    per_group = config.num_attention_heads // groups * d
    q, k, v = qkv.reshape(groups, per_group + 2 * d, hidden).split([per_group, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def megatron_piece(key: str, box: Box, read: Read, config: ModelConfig) -> torch.Tensor:
    """One box of Megatron key (as megatron_boxes cuts it), built from our tensors."""
    if not key.startswith("decoder.layers."):
        name = next(ours for ours, theirs in TOP_KEYS.items() if theirs == key)
        tensor = read(name, None)
        if key in VOCAB_KEYS:  # Megatron's padded vocabulary rows are zeros
            return torch.nn.functional.pad(tensor, (0, 0, 0, box[1][0] - tensor.shape[0]))
        return tensor
    layer = box[0][0]
    if key == QKV:
        q, k, v = (read(f"layers.{layer}.{part}", None) for part in QKV_PARTS)
        return fuse_qkv(q, k, v, config)[None]
    expert = box[0][1] if key in (FC1, FC2) else None
    return read(f"layers.{layer}.{SUFFIX_OF[key]}", expert)[None]


def our_piece(name: str, expert: int | None, read_box: ReadBox, config: ModelConfig) -> torch.Tensor:
    """Our tensor `name` (or its expert slice [1, ...]) from boxes of Megatron keys."""
    shapes = megatron_shapes(config)
    match = LAYER_NAME.fullmatch(name)
    if match is None:
        key = TOP_KEYS[name]
        return read_box(key, whole(shapes[key]))
    layer, suffix = int(match.group(1)), match.group(2)
    if suffix in QKV_PARTS:
        rows = shapes[QKV][1:]
        qkv = read_box(QKV, ((layer, 0, 0), (1, *rows)))[0]
        return split_qkv(qkv, config)[QKV_PARTS.index(suffix)]
    key = LAYER_KEYS[suffix]
    shape = shapes[key]
    if expert is None:
        return read_box(key, ((layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])))[0]
    return read_box(key, ((layer, expert, 0, 0), (1, 1, *shape[2:])))[0]


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(*box))


def to_megatron_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron torch_dist tensors (global, unsharded) from our full state dict."""

    def read(name: str, expert: int | None) -> torch.Tensor:
        return state[name] if expert is None else state[name][expert : expert + 1]

    out = {}
    for key, shape in megatron_shapes(config).items():
        full = torch.empty(shape, dtype=state["embed_tokens.weight"].dtype)
        for box in megatron_boxes(key, shape):
            full[_slices(box)] = megatron_piece(key, box, read, config)
        out[key] = full
    return out


def from_megatron_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict from Megatron torch_dist tensors (padded vocabulary rows are dropped)."""
    return {
        name: our_piece(name, None, lambda key, box: state[key][_slices(box)], config).clone()
        for name in parameter_shapes(config)
    }


def iteration_dir(path: Path) -> Path:
    """The checkpoint directory itself, or the one a Megatron save dir's tracker file names."""
    tracker = path / TRACKER
    if (path / METADATA).is_file() or not tracker.is_file():
        return path
    text = tracker.read_text().strip()
    if text == RELEASE:
        return path / RELEASE
    if not text.isdigit():
        raise MixtralError(
            f"{tracker}: holds {text[:40]!r}, not an iteration number or '{RELEASE}'; pass the "
            f"iteration directory itself"
        )
    return path / f"iter_{int(text):07d}"


def is_megatron(path: Path) -> bool:
    return (iteration_dir(path) / METADATA).is_file()


class MegatronSource:
    """Our tensors, read on demand from a Megatron torch_dist checkpoint (one layer or expert at a time)."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None) -> None:
        self.path = iteration_dir(Path(path))
        meta_file = self.path / METADATA
        try:
            backend = json.loads(meta_file.read_text()).get("sharded_backend")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise MixtralError(f"{meta_file}: unreadable ({exc}); not a Megatron distributed checkpoint") from None
        if backend != "torch_dist":
            raise MixtralError(
                f"{meta_file}: sharded_backend is {backend!r}; only 'torch_dist' is read. Re-save "
                f"it with Megatron's --ckpt-format torch_dist"
            )
        self.config = self._config(config)
        self.shapes = parameter_shapes(self.config)
        self.metadata = read_dcp_metadata(self.path)
        self.keys = self._resolve_keys()
        self.dtype = self.metadata.state_dict_metadata[self.keys[QKV]].properties.dtype
        self._last: tuple[str, Box, torch.Tensor] | None = None  # q, k and v come from one QKV box
        self._assembled: tuple[str, int | None, torch.Tensor] | None = None

    def _config(self, given: ModelConfig | None) -> ModelConfig:
        """The given config, else our config.json beside the weights; both must agree."""
        if not (self.path / CONFIG).is_file():
            if given is None:
                raise MixtralError(
                    f"{self.path}: a Megatron checkpoint does not record the model's shape in a "
                    f"form read without unpickling; pass --config with the HF config.json or preset"
                )
            return given
        saved = ModelConfig.from_json(self.path / CONFIG)
        fields, wanted = saved.to_hf_dict(), (given or saved).to_hf_dict()
        differ = [f"{k}: {wanted.get(k)!r} given, {v!r} saved" for k, v in fields.items() if v != wanted.get(k)]
        if differ:
            raise MixtralError(
                f"{self.path}: --config does not match the {CONFIG} saved with these weights "
                f"({'; '.join(differ[:3])}); drop --config"
            )
        return saved

    def _resolve_keys(self) -> dict[str, str]:
        stored = self.metadata.state_dict_metadata
        if self.config.tie_word_embeddings and TOP_KEYS["lm_head.weight"] in stored:
            raise MixtralError(
                f"{self.path}: holds '{TOP_KEYS['lm_head.weight']}' but the config ties the "
                f"embeddings (tie_word_embeddings); pass the config.json these weights were trained "
                f"with (--config)"
            )
        keys = {}
        for key, shape in megatron_shapes(self.config).items():
            found = next((k for k in (key, *ALIASES.get(key, ())) if k in stored), None)
            if found is None:
                what = " (not a mixture-of-experts model?)" if key in (FC1, FC2, QKV) else ""
                raise MixtralError(
                    f"{self.path}: tensor '{key}' is missing{what}; the checkpoint is not a Mixtral "
                    f"saved by megatron-core's GPTModel, or the config does not match it"
                )
            got = tuple(getattr(stored[found], "size", ()))
            padded = key in VOCAB_KEYS and len(got) == 2 and got[1] == shape[1] and got[0] >= shape[0]
            if got != shape and not padded:
                raise MixtralError(
                    f"{self.path}: tensor '{found}' has shape {list(got)} but the config implies "
                    f"{list(shape)}; pass the config.json these weights were trained with (--config)"
                )
            keys[key] = found
        return keys

    def read_stored(self, key: str, box: Box) -> torch.Tensor:
        """A box of a Megatron tensor (by our key for it); the last one is kept: q, k and v share a QKV box."""
        if self._last is not None and self._last[:2] == (key, box):
            return self._last[2]
        tensor = read_boxes(self.path, {self.keys[key]: [box]}, self.metadata)[self.keys[key]][0]
        self._last = (key, box, tensor)
        return tensor

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        return our_piece(name, expert, self.read_stored, self.config)

    def read_box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """Cut from our whole parameter (or expert), which is assembled from Megatron's fused tensors once for all
        the blocks a loader reads of it."""
        expert = box[0].start if name.endswith(EXPERT_SUFFIXES) and box[0].stop - box[0].start == 1 else None
        if self._assembled is None or self._assembled[:2] != (name, expert):
            self._assembled = (name, expert, self.read(name, expert))
        return self._assembled[2][(slice(0, 1), *box[1:]) if expert is not None else box]


class _ObjectSavePlanner(_SavePlanner):
    """The streaming save planner, storing each ShardedObject's list whole (torch.save([data]), as megatron-core
    does) rather than flattening it into its elements."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False)


def save_megatron(
    path: Path,
    read: Read,
    config: ModelConfig,
    dtype: torch.dtype,
    on_write: Callable[[int], None] | None = None,
    spec: str = "local",
    vocab_rows: int | None = None,
) -> Path:
    """Write a Megatron save dir atomically: `release/` (the torch_dist DCP files with exactly the keys spec's
    GPTModel asks for, metadata.json, our config.json) plus the tracker file Megatron's --load reads; tensors are
    built and written one box at a time, one file each. vocab_rows pads the vocabulary (padded_vocab_size)."""
    modules = layer_spec(spec)
    shapes = megatron_shapes(config, vocab_rows)
    if shapes["embedding.word_embeddings.weight"][0] < config.vocab_size:
        raise MixtralError(
            f"a padded vocabulary of {vocab_rows} rows is smaller than the vocabulary "
            f"({config.vocab_size}); pad it to a multiple of --make-vocab-size-divisible-by x "
            f"--megatron-tp"
        )
    state: dict[str, Any] = {
        modules.renames.get(key, key): LazyTensor(
            shape,
            dtype,
            megatron_boxes(key, shape),
            lambda box, key=key: megatron_piece(key, box, read, config),
            on_write,
        )
        for key, shape in shapes.items()
    }
    state |= megatron_objects(config, modules)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        release = tmp / RELEASE
        release.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.save(
                state,
                storage_writer=FileSystemWriter(release, single_file_per_rank=False),
                planner=_ObjectSavePlanner(),
            )
        (release / METADATA).write_text(json.dumps(CHECKPOINTING_CONFIG))
        (release / CONFIG).write_text(json.dumps(config.to_hf_dict(), indent=2))
        (tmp / TRACKER).write_text(RELEASE)
        publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path / RELEASE
