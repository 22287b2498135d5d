"""ParallelDims: the parallel layout, checked against the world size and the model, and its device meshes.

Ranks are laid out as (pp, dp, cp, tp), tp innermost (neighbouring ranks share the fastest links).
Experts use a second view of the same ranks, (pp, edp, ep, etp), as Megatron-core does: expert tensor
parallelism folds over tp and expert parallelism over the remaining data-like ranks (dp x cp, plus
tp / etp), so edp = dp * cp * tp / (ep * etp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mixtral.config import ModelConfig, divisors
from mixtral.errors import MixtralError

MESH_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_MESH_DIMS = ("pp", "edp", "ep", "etp")


@dataclass(frozen=True)
class ParallelMeshes:
    world: DeviceMesh  # (pp, dp, cp, tp), every name always present (size 1 when unused)
    dp_cp: DeviceMesh  # dp and cp flattened: gradient and loss reduction, FSDP sharding
    expert: DeviceMesh | None = None  # (pp, edp, ep, etp), built only when ep or etp > 1

    def __getitem__(self, name: str) -> DeviceMesh:
        if name == "dp_cp":
            return self.dp_cp
        if name in EXPERT_MESH_DIMS[1:]:
            if self.expert is None:
                raise KeyError(f"mesh '{name}' exists only when parallel.ep or parallel.etp > 1")
            return self.expert[name]
        return self.world[name]


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    world_size: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the degrees against each other and the world size; each error names the fix."""
        for name in ("dp", "tp", "pp", "cp", "ep", "etp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MixtralError(f"parallel.{name} must be a positive integer, got {value!r}")
        product = self.dp * self.cp * self.tp * self.pp
        if product != self.world_size:
            fix = (
                f"set parallel.dp to {self.world_size // (self.cp * self.tp * self.pp)}"
                if self.world_size % (self.cp * self.tp * self.pp) == 0
                else f"launch {product} processes"
            )
            raise MixtralError(
                f"parallel layout: dp ({self.dp}) x cp ({self.cp}) x tp ({self.tp}) x pp ({self.pp}) "
                f"= {product} does not equal the world size {self.world_size}; {fix}"
            )
        if self.tp % self.etp:
            raise MixtralError(
                f"parallel.etp ({self.etp}) must divide parallel.tp ({self.tp}): expert tensor "
                f"parallelism folds over the tp ranks; choose etp from {divisors(self.tp)}"
            )
        stage = self.dp * self.cp * self.tp
        if stage % (self.ep * self.etp):
            choices = divisors(stage // self.etp)
            raise MixtralError(
                f"parallel.ep ({self.ep}) x etp ({self.etp}) = {self.ep * self.etp} must divide "
                f"dp x cp x tp = {stage} (the ranks of one pipeline stage, over which experts fold); "
                f"choose ep from {choices}"
            )

    @property
    def edp(self) -> int:
        """Expert data parallel degree: replicas of each expert shard within a pipeline stage."""
        return self.dp * self.cp * self.tp // (self.ep * self.etp)

    @property
    def sequence_divisor(self) -> int:
        """The sequence length must be a multiple of this: cp shards it, then sp shards each cp chunk by tp."""
        return self.cp * (self.tp if self.sp else 1)

    def validate_model(self, config: ModelConfig, seq_len: int | None = None) -> None:
        """Check that the model's heads, experts, layers and the sequence length split evenly."""
        checks = [
            ("tp", self.tp, "num_attention_heads", config.num_attention_heads),
            ("tp", self.tp, "num_key_value_heads", config.num_key_value_heads),
            ("ep", self.ep, "num_local_experts", config.num_local_experts),
            ("etp", self.etp, "intermediate_size", config.intermediate_size),
            ("pp", self.pp, "num_hidden_layers", config.num_hidden_layers),
        ]
        for dim, degree, field, value in checks:
            if value % degree:
                if dim == "tp":
                    fits = divisors(math.gcd(config.num_attention_heads, config.num_key_value_heads))
                else:
                    fits = divisors(value)
                raise MixtralError(
                    f"parallel.{dim}={degree}: the model's {field} ({value}) is not divisible by "
                    f"{dim} ({degree}); choose {dim} from {fits}"
                )
        if seq_len is not None and seq_len % self.sequence_divisor:
            what = "cp x tp (sequence parallel)" if self.sp and self.tp > 1 else "cp"
            raise MixtralError(
                f"sequence length {seq_len} is not divisible by {what} = {self.sequence_divisor}; "
                f"use a sequence length that is a multiple of {self.sequence_divisor}"
            )

    def build_meshes(self, device_type: str) -> ParallelMeshes:
        """Named device meshes over the initialised default process group (all ranks must call this)."""
        world = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=MESH_DIMS)
        dp_cp = world["dp", "cp"]._flatten("dp_cp")  # private in torch 2.9 .. 2.13, same signature
        expert = None
        if self.ep > 1 or self.etp > 1:
            expert = init_device_mesh(
                device_type, (self.pp, self.edp, self.ep, self.etp), mesh_dim_names=EXPERT_MESH_DIMS
            )
        return ParallelMeshes(world, dp_cp, expert)
