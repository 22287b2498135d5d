"""ModelConfig: Mixtral's hyper-parameters, read from an HF config.json or a named preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral.errors import MixtralError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.0
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    def validate(self, source: str = "the model config") -> None:
        """Reject configurations no Mixtral can have, naming the field."""
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MixtralError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MixtralError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise MixtralError(
                f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise MixtralError(f"{source}: head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise MixtralError(f"{source}: sliding_window must be positive or null, got {self.sliding_window}")

    @property
    def num_parameters(self) -> int:
        """Total parameter count (every expert counted)."""
        h, f, e, d = self.hidden_size, self.intermediate_size, self.num_local_experts, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        moe = e * 3 * h * f + e * h
        per_layer = attn + moe + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h

    @property
    def active_parameters(self) -> int:
        """Parameters touched per token: top-k experts instead of all of them."""
        h, f, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        unused = self.num_hidden_layers * (e - self.num_experts_per_tok) * 3 * h * f
        return self.num_parameters - unused

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included."""
        matmul = 2 * (
            self.active_parameters - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
        )
        attention = 2 * 2 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len / 2
        return 3 * (matmul + attention)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for MixtralForCausalLM."""
        out = dataclasses.asdict(self)
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            hidden_act="silu",
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            output_router_logits=False,
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the model config") -> "ModelConfig":
        """Build from HF-style fields; unknown HF bookkeeping keys are ignored, ours are checked."""
        model_type = data.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise MixtralError(
                f"{source}: model_type is '{model_type}', not 'mixtral'; mixtral-run only runs Mixtral checkpoints"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        rope = data.get("rope_parameters") or data.get("rope_scaling")
        if "rope_theta" not in kwargs and isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            raise MixtralError(f"{source}: rope type '{rope['rope_type']}' is not supported; only default RoPE")
        for required in REQUIRED_HF_FIELDS:
            if required not in data:
                raise MixtralError(f"{source}: required field '{required}' is missing")
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0]
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise MixtralError(f"{source}: {exc}") from None
        except MixtralError as exc:
            raise MixtralError(str(exc).replace("the model config", source)) from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MixtralError(f"{path}: no config.json here; pass an HF Mixtral directory or a preset name")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MixtralError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise MixtralError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
    "num_experts_per_tok",
)

EP_COMMS = ("alltoall", "allgather")  # expert parallel exchange: uneven all-to-all, or all-gather + reduce-scatter
CP_ALGOS = ("allgather", "ring")  # context parallel attention: gather K/V, or pass them round a ring


def divisors(n: int) -> list[int]:
    """The degrees that split n evenly: the choices an error about a layout that does not divide offers."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class CapacityBinsConfig:
    """The recipe's `moe.capacity_bins` mapping; defaults are Gaudi's Mixtral script."""

    num_bins: int = 10
    exp_base: float = 1.5
    alignment: int = 64
    optimize_interval: int = 300  # steps between optimize_bins calls; 0 turns re-optimisation off
    group_size: int = 4  # consecutive layers that share one set of bins
    tokens: int | None = None  # tokens per micro-batch the bins span; None: the first training batch's

    def __post_init__(self) -> None:
        for name in ("num_bins", "alignment", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MixtralError(f"moe.capacity_bins.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.optimize_interval, int) or self.optimize_interval < 0:
            raise MixtralError(
                f"moe.capacity_bins.optimize_interval must be an integer >= 0 (0: never), "
                f"got {self.optimize_interval!r}"
            )
        if not isinstance(self.exp_base, (int, float)) or self.exp_base < 1.0:
            raise MixtralError(f"moe.capacity_bins.exp_base must be a number >= 1.0, got {self.exp_base!r}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise MixtralError(f"moe.capacity_bins.tokens must be a positive integer or null, got {self.tokens!r}")

    @classmethod
    def from_value(cls, value: Any) -> "CapacityBinsConfig":
        """From the recipe's mapping (or None for the defaults); unknown keys are named."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if not isinstance(value, dict):
            raise MixtralError(f"moe.capacity_bins must be a mapping of options, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise MixtralError(
                f"moe.capacity_bins: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**value)


@dataclass(frozen=True)
class MoEConfig:
    """How tokens reach experts, and the router's losses: the recipe's `moe` section, field for field."""

    dispatcher: str = "dropless"  # dropless | capacity | capacity_bins
    capacity_factor: float | None = None  # capacity only: C = ceil(factor * tokens * top_k / experts)
    capacity_per: str = "batch"  # batch (micro-batch) | sequence (MLPerf: int(seq * top_k / E * cf))
    drop_policy: str = "position"  # position (first come, GShard) | probs (lowest weight dropped first)
    pad_to_capacity: bool = True  # static [E, C, H] expert inputs; False: drop and pack
    capacity_bins: CapacityBinsConfig | None = None  # capacity_bins only (None: its defaults)
    aux_loss_coeff: float | None = None  # None: the model config's router_aux_loss_coef
    z_loss_coeff: float = 0.0
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3): bias for selection only
    expert_bias_update_rate: float = 1e-3  # bias += rate * sign(mean load - load) after each step
    jitter: float | None = None  # router input jitter in training; None: router_jitter_noise
    ep_comm: str = "alltoall"  # expert parallel exchange: alltoall (uneven splits) | allgather

    def __post_init__(self) -> None:
        from mixtral.backend import DISPATCHERS

        if self.dispatcher not in DISPATCHERS:
            raise MixtralError(
                f"moe.dispatcher '{self.dispatcher}' is unknown; choose one of: {', '.join(DISPATCHERS)}"
            )
        for name, allowed in (
            ("capacity_per", ("batch", "sequence")),
            ("drop_policy", ("position", "probs")),
            ("ep_comm", EP_COMMS),
        ):
            if getattr(self, name) not in allowed:
                raise MixtralError(
                    f"moe.{name} '{getattr(self, name)}' is unknown; choose one of: {', '.join(allowed)}"
                )
        if self.dispatcher == "capacity" and (self.capacity_factor is None or self.capacity_factor <= 0):
            raise MixtralError(
                f"moe.capacity_factor must be a positive number with dispatcher 'capacity' "
                f"(got {self.capacity_factor!r}); MLPerf uses 1.25, and >= experts / top_k never drops"
            )
        if self.dispatcher != "capacity" and self.capacity_factor is not None:
            hint = (
                "capacity bins never drop and need no factor"
                if self.dispatcher == "capacity_bins"
                else "use dispatcher: capacity"
            )
            raise MixtralError(
                f"moe.capacity_factor is set but moe.dispatcher is '{self.dispatcher}'; remove capacity_factor ({hint})"
            )
        if self.dispatcher == "capacity_bins":
            object.__setattr__(self, "capacity_bins", CapacityBinsConfig.from_value(self.capacity_bins))
        elif self.capacity_bins is not None:
            raise MixtralError(
                f"moe.capacity_bins is set but moe.dispatcher is '{self.dispatcher}'; "
                f"set dispatcher: capacity_bins or remove capacity_bins"
            )
        for name in ("z_loss_coeff", "expert_bias_update_rate", "jitter", "aux_loss_coeff"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise MixtralError(f"moe.{name} must be a number >= 0, got {value!r}")


# Public numbers of mistralai/Mixtral-8x7B-v0.1 and Mixtral-8x22B-v0.1 config.json.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "8x7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
    ),
    "8x22b": dict(
        vocab_size=32000,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=65536,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
    ),
}
