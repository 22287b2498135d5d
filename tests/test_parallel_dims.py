"""ParallelDims: validation messages (no processes) and mesh layouts on a fake 8-rank world."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from mixtral.errors import MixtralError
from mixtral.parallel import ParallelDims, apply_data_parallel

from conftest import small_config


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(dp=2, tp=2, world_size=8),
            r"dp \(2\) x cp \(1\) x tp \(2\) x pp \(1\) = 4 does not equal the world size 8; set parallel.dp to 4",
        ),
        (dict(dp=1, tp=4, world_size=2), r"= 4 does not equal the world size 2; launch 4 processes"),
        (dict(dp=0, world_size=1), r"parallel.dp must be a positive integer, got 0"),
        (
            dict(tp=4, etp=3, world_size=4),
            r"parallel.etp \(3\) must divide parallel.tp \(4\).*choose etp from \[1, 2, 4\]",
        ),
        (
            dict(dp=3, tp=2, ep=4, etp=2, world_size=6),
            r"parallel.ep \(4\) x etp \(2\) = 8 must divide dp x cp x tp = 6 .*choose ep from \[1, 3\]",
        ),
    ],
)
def test_world_layout_errors_name_the_dimension_and_the_fix(fields, message) -> None:
    with pytest.raises(MixtralError, match=message):
        ParallelDims(**fields)


@pytest.mark.parametrize(
    "fields, seq_len, message",
    [
        (
            dict(tp=4, world_size=4),
            None,
            r"parallel.tp=4: the model's num_attention_heads \(6\) is not divisible by tp "
            r"\(4\); choose tp from \[1, 2\]",
        ),
        (
            dict(tp=3, world_size=3),
            None,
            r"num_key_value_heads \(2\) is not divisible by tp \(3\); choose tp from \[1, 2\]",
        ),
        (
            dict(dp=2, ep=2, world_size=2),
            None,
            r"parallel.ep=2: the model's num_local_experts \(5\) .*choose ep from \[1, 5\]",
        ),
        (dict(tp=2, etp=2, world_size=2), None, r"parallel.etp=2: the model's intermediate_size \(41\)"),
        (
            dict(pp=3, world_size=3),
            None,
            r"parallel.pp=3: the model's num_hidden_layers \(2\) .*choose pp from \[1, 2\]",
        ),
        (
            dict(cp=2, tp=2, sp=True, world_size=4),
            18,
            r"sequence length 18 is not divisible by cp x tp \(sequence parallel\) "
            r"= 4; use a sequence length that is a multiple of 4",
        ),
        (dict(cp=2, world_size=2), 17, r"sequence length 17 is not divisible by cp = 2"),
    ],
)
def test_model_errors_name_the_numbers_that_do_not_divide(fields, seq_len, message) -> None:
    dims = ParallelDims(**fields)
    with pytest.raises(MixtralError, match=message):
        dims.validate_model(small_config(intermediate_size=41), seq_len)


def test_a_layout_that_fits_passes() -> None:
    dims = ParallelDims(dp=2, tp=2, pp=2, cp=1, ep=2, etp=1, sp=True, world_size=8)
    dims.validate_model(small_config(num_local_experts=4), seq_len=32)
    assert dims.edp == 2 and dims.sequence_divisor == 2


@pytest.fixture
def fake_world():
    """A fake 8-rank process group in this process (no communication), torn down after the test."""

    def join(rank: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)

    yield join
    dist.destroy_process_group()


def test_meshes_on_a_fake_world(fake_world) -> None:
    fake_world(5)  # rank 5 = (pp 1, dp 0, cp 0, tp 1) in (pp=2, dp=1, cp=2, tp=2)
    meshes = ParallelDims(dp=1, cp=2, tp=2, pp=2, ep=2, etp=2, world_size=8).build_meshes("cpu")
    assert meshes.world.mesh_dim_names == ("pp", "dp", "cp", "tp")
    assert tuple(meshes.world.shape) == (2, 1, 2, 2)
    groups = {name: meshes[name].mesh.tolist() for name in ("pp", "dp", "cp", "tp", "dp_cp", "edp", "ep", "etp")}
    assert groups == {
        "pp": [1, 5],
        "dp": [5],
        "cp": [5, 7],
        "tp": [4, 5],
        "dp_cp": [5, 7],
        "edp": [5],
        "ep": [5, 7],
        "etp": [4, 5],
    }


def test_expert_parallel_folds_over_dp_and_cp_and_borrows_tp_without_etp(fake_world) -> None:
    fake_world(0)
    meshes = ParallelDims(dp=2, tp=2, pp=2, ep=4, etp=1, world_size=8).build_meshes("cpu")
    assert tuple(meshes.expert.shape) == (2, 1, 4, 1)
    assert meshes["ep"].mesh.tolist() == [0, 1, 2, 3]  # a whole pipeline stage: dp x tp
    assert meshes["dp"].mesh.tolist() == [0, 2] and meshes["tp"].mesh.tolist() == [0, 1]


def test_no_expert_mesh_without_expert_parallelism(fake_world) -> None:
    fake_world(0)
    meshes = ParallelDims(dp=8, world_size=8).build_meshes("cpu")
    assert meshes.expert is None and meshes["dp_cp"].size() == 8
    with pytest.raises(KeyError, match="exists only when parallel.ep or parallel.etp > 1"):
        meshes["ep"]


def test_zero_level_errors() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(MixtralError, match=r"parallel.zero must be one of \(0, 1, 2, 3\), got 4"):
        apply_data_parallel(model, None, zero=4)
    with pytest.raises(
        MixtralError,
        match=r"zero=0 \(DDP replicate\) does not compose with tensor parallelism; "
        r"set parallel.zero to 1, 2 or 3",
    ):
        apply_data_parallel(model, None, zero=0, tp_enabled=True)
