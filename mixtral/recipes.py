"""Recipes: one YAML file per training layout, loaded into typed dataclasses and checked key by key.

A recipe is found by path or by name in recipes/ (`cpu-tiny` -> recipes/cpu-tiny.yaml). Command-line
`key=value` overrides use dotted section names (`optimizer.lr=1e-4`). Every unknown key and every value
of the wrong type is a MixtralError naming the key, the expected type and the allowed keys or values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mixtral.config import CP_ALGOS, ModelConfig, MoEConfig
from mixtral.data.loader import DataConfig
from mixtral.errors import MixtralError
from mixtral.planner import devices

RECIPES_DIR = Path(__file__).parent / "recipes"  # the repository's recipes/, shipped inside the package

# The model section: where the config comes from, plus any ModelConfig field as an override (None: keep).
_MODEL_FIELDS = [
    (f.name, typing.get_type_hints(ModelConfig)[f.name] | None, field(default=None))
    for f in dataclasses.fields(ModelConfig)
]
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [
        ("preset", str | None, field(default=None)),  # tiny | 8x7b | 8x22b
        ("config", str | None, field(default=None)),  # an HF config.json or a directory holding one
        (
            "init_from",
            str | None,
            field(default=None),
        ),  # HF, native or Megatron checkpoint, or run dir, to fine-tune from
        *_MODEL_FIELDS,
    ],
)
ModelSection.__doc__ = "The recipe's `model` section: preset, config or init_from, then field overrides."
ModelSection.__module__ = __name__  # so that recipes pickle (spawned processes get them)


@dataclass
class OptimizerSection:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ScheduleSection:
    name: Literal["cosine", "linear", "constant", "warmup_hold"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float | None = None  # of train.steps; replaces warmup_steps (MLPerf MoE: 0.25)
    min_lr_ratio: float = 0.1  # cosine/linear decay down to lr * min_lr_ratio
    decay_steps: int | None = None  # cosine/linear: decay ends at this step, then lr * min_lr_ratio
    # (Megatron --lr-decay-iters; beyond train.steps: cut short); None: train.steps

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of total_steps: warmup_fraction of it when set, else warmup_steps."""
        return round(self.warmup_fraction * total_steps) if self.warmup_fraction is not None else self.warmup_steps


@dataclass
class BatchSection:
    micro_batch: int = 1  # sequences per forward/backward on one rank
    global_batch: int = 1  # sequences per optimizer step over all ranks


@dataclass
class ParallelSection:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    zero: Literal[0, 1, 2, 3] = 1  # 0: DDP; 1 distributed optimizer; 2 also gradients; 3 also weights (FSDP)
    cp_algo: Literal[CP_ALGOS] = "allgather"  # context parallel attention: gather K/V, or pass them round
    # pipeline schedule; its micro-batches are the step's batch.micro_batch ones (global_batch / (micro_batch x dp))
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"

    @property
    def world_size(self) -> int:
        """Ranks one replica set needs: ep folds over dp x cp and etp over tp, as Megatron-core does."""
        return self.dp * self.tp * self.pp * self.cp


@dataclass
class HardwareSection:
    """What the recipe was validated on: `recipe validate` checks memory and world size against it."""

    device: str | None = None  # a planner device (`mixtral-run recipe plan`); None: the backend's own
    devices: int | None = None  # accelerators in all; None: the layout's world size
    nodes: int | None = None  # hosts; checked against the device's devices per host


@dataclass
class EvalSection:
    interval: int = 100  # evaluate every `interval` steps or tokens (see unit); 0: never
    unit: Literal["steps", "tokens"] = "steps"
    samples: int = 64  # validation sequences per evaluation
    target_loss: float | None = None  # stop the run once the eval loss is at or below it (MLPerf)
    at_start: bool = False  # also evaluate the initial model at step 0 (a fresh run's baseline)


@dataclass
class CheckpointSection:
    interval: int = 100  # steps between checkpoints; 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; 0: all
    dir: str | None = None  # default <train.output_dir>/checkpoints


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    output_dir: str | None = None  # default runs/<recipe name>
    log_interval: int = 1  # steps between metrics lines
    expert_load_interval: int = 10  # steps between per-layer expert load lines; 0: never
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None: measured once
    tensorboard: bool = True  # also log to TensorBoard when it is installed


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    seq_len: int = 2048
    precision: Literal["fp32", "bf16", "bf16_master"] = "fp32"  # bf16: autocast; bf16_master: bf16 params, fp32 master
    mode: Literal["train", "inference"] = "train"  # inference recipes: memory of weights and KV cache, no step time
    # none; selective: every other block; full: every block; moe: the MoE layer only (Megatron --moe-layer-recompute)
    activation_checkpointing: Literal["none", "selective", "moe", "full"] = "none"
    compile: bool = False  # torch.compile every block (the backend's compiler); dropless / EP dispatch stays eager
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    train: TrainSection = field(default_factory=TrainSection)
    backend: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)  # handed to the backend as is (Backend.configure)
    hardware: HardwareSection = field(default_factory=HardwareSection)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.batch.global_batch // (self.batch.micro_batch * self.parallel.dp)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or Path("runs") / self.name)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.output_dir / "checkpoints"

    def model_config(self) -> ModelConfig:
        """The ModelConfig: from init_from, config or preset, then the section's field overrides."""
        m = self.model
        if m.init_from:
            from mixtral.checkpoint.loading import checkpoint_config

            base = checkpoint_config(m.init_from)
        elif m.config:
            base = ModelConfig.from_json(m.config)
        elif m.preset:
            base = ModelConfig.preset(m.preset)
        else:
            base = ModelConfig
        overrides = {f: getattr(m, f) for f, _, _ in _MODEL_FIELDS if getattr(m, f) is not None}
        if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & overrides.keys():
            overrides["head_dim"] = None  # derived again from the new sizes
        try:
            return ModelConfig(**overrides) if base is ModelConfig else base.replace(**overrides)
        except MixtralError as exc:
            raise MixtralError(f"recipe section 'model': {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Cross-field rules the types cannot express."""
        positive = {
            "seq_len": self.seq_len,
            "batch.micro_batch": self.batch.micro_batch,
            "batch.global_batch": self.batch.global_batch,
            "train.steps": self.train.steps,
            "train.log_interval": self.train.log_interval,
            "train.max_bad_steps": self.train.max_bad_steps,
            "eval.samples": self.eval.samples,
            "optimizer.lr": self.optimizer.lr,
            **{f"parallel.{d}": getattr(self.parallel, d) for d in ("dp", "tp", "pp", "cp", "ep", "etp")},
            **{
                f"hardware.{k}": getattr(self.hardware, k)
                for k in ("devices", "nodes")
                if getattr(self.hardware, k) is not None
            },
        }
        for key, value in positive.items():
            if value <= 0:
                raise MixtralError(f"recipe key '{key}' must be positive, got {value}")
        if self.hardware.device is not None and self.hardware.device not in devices():
            raise MixtralError(
                f"recipe key 'hardware.device' expects one of {', '.join(devices())} (the devices "
                f"the registered backends declare), got {self.hardware.device!r}"
            )
        for key in (
            "eval.interval",
            "checkpoint.interval",
            "checkpoint.keep_last",
            "train.expert_load_interval",
            "schedule.warmup_steps",
            "optimizer.weight_decay",
            "optimizer.grad_clip",
        ):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 0:
                raise MixtralError(f"recipe key '{key}' must be >= 0, got {getattr(getattr(self, section), name)}")
        per_step = self.batch.micro_batch * self.parallel.dp
        if self.batch.global_batch % per_step:
            raise MixtralError(
                f"batch.global_batch ({self.batch.global_batch}) must be a multiple of batch.micro_batch "
                f"({self.batch.micro_batch}) x parallel.dp ({self.parallel.dp}) = {per_step}: gradient "
                f"accumulation = global_batch / (micro_batch x dp) must be a whole number"
            )
        fraction = self.schedule.warmup_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise MixtralError(f"recipe key 'schedule.warmup_fraction' must be between 0 and 1, got {fraction}")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise MixtralError(
                f"recipe key 'schedule.min_lr_ratio' must be between 0 and 1, got {self.schedule.min_lr_ratio}"
            )
        self._validate_decay()
        if not all(0 <= b < 1 for b in self.optimizer.betas):
            raise MixtralError(
                f"recipe key 'optimizer.betas' must be two numbers in [0, 1), got {self.optimizer.betas}"
            )
        sources = [k for k in ("preset", "config", "init_from") if getattr(self.model, k)]
        if len(sources) > 1:
            raise MixtralError(
                f"recipe section 'model' sets {' and '.join(sources)}; set only one of preset, "
                f"config, init_from (the others' fields go in as overrides)"
            )
        self.data.validate()

    def _validate_decay(self) -> None:
        decay = self.schedule.decay_steps
        if decay is None:
            return
        if self.schedule.name not in ("cosine", "linear"):
            raise MixtralError(
                f"recipe key 'schedule.decay_steps' applies to the cosine and linear schedules, not "
                f"'{self.schedule.name}'; remove it or set schedule.name=cosine"
            )
        if decay <= self.schedule.warmup(self.train.steps):
            raise MixtralError(
                f"recipe key 'schedule.decay_steps' ({decay}) must be larger than the warmup "
                f"({self.schedule.warmup(self.train.steps)} steps): decay starts after it; "
                f"raise decay_steps or leave it unset to decay until train.steps"
            )


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the resolved recipe is plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        return "a mapping of names to values"
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} " + "/".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """value as type tp, or _Mismatch. Floats accept ints and numeric strings (YAML reads `3e-4` as a string)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def _optional_sections(cls: type) -> dict[str, type]:
    """Fields typed `SomeSection | None`: name -> the section's dataclass."""
    sections = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if (
            typing.get_origin(tp) in (typing.Union, types.UnionType)
            and len(args) == 1
            and dataclasses.is_dataclass(args[0])
        ):
            sections[name] = args[0]
    return sections


def _hints(cls: type) -> dict[str, Any]:
    """Field types, an optional section (`SomeConfig | None`) as its section type."""
    return typing.get_type_hints(cls) | _optional_sections(cls)


def _unknown_key(key: str, allowed: list[str]) -> MixtralError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else "the recipe"
    return MixtralError(f"unknown recipe key '{key}'{hint}; allowed keys in {section}: {', '.join(allowed)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the dataclass cls from a mapping, every key and type checked."""
    where = prefix or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MixtralError(f"recipe section '{where}' must be a mapping of keys to values, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_key(full, names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):  # an optional section given as null stays unset
            kwargs[key] = None if value is None and key in _optional_sections(cls) else _build(tp, value, full)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise MixtralError(
                f"recipe key '{full}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            ) from None
    try:
        return cls(**kwargs)
    except MixtralError as exc:
        raise MixtralError(f"recipe section '{where}': {exc}") from None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Put value at the dotted key, checking each part against the schema so errors name the allowed keys."""
    parts = key.split(".")
    cls, node = Recipe, data
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        full = ".".join(parts[: i + 1])
        if part not in names:
            raise _unknown_key(full, names)
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if typing.get_origin(tp) is dict:  # a free mapping (backend_options): the rest of the key is one entry
            node[part] = {**(node.get(part) or {}), ".".join(parts[i + 1 :]): value}
            return
        if not dataclasses.is_dataclass(tp):
            raise MixtralError(f"recipe key '{full}' is a value, not a section; '{key}' does not exist")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls = node[part], tp


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in text:
        raise MixtralError(f"override '{text}' is not key=value; write e.g. optimizer.lr=1e-4 or train.steps=50")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def find_recipe(path_or_name: str | Path) -> Path:
    """A recipe file by path, or by name in the shipped recipes, then in ./recipes."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    for folder in (RECIPES_DIR, Path("recipes")):
        candidate = folder / f"{path_or_name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise MixtralError(
        f"recipe '{path_or_name}' not found: not a file, nor a name in {RECIPES_DIR}; "
        f"known recipes: {', '.join(known) or 'none'}"
    )


def recipe_from_dict(data: dict[str, Any], overrides: list[str] = (), name: str | None = None) -> Recipe:
    """A validated Recipe from parsed YAML plus `key=value` overrides."""
    data = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    if name and "name" not in data:
        data["name"] = name
    recipe = _build(Recipe, data, "")
    recipe.validate()
    return recipe


def load_recipe(path_or_name: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at a path or with a name, overrides applied, validated."""
    path = find_recipe(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MixtralError(f"{path}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise MixtralError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(data or {}, overrides, name=path.stem)
