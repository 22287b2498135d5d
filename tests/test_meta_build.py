"""Real-size building: the model is laid out on the meta device, each rank materialises and fills only its shards.

Initialisation is layout-independent (the same seed gives bit-identical global weights in one process and under
every layout), and a checkpoint is read piece by piece into whatever each rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from mixtral.backend import get_backend
from mixtral.build import build_for_training, build_on_meta, materialize
from mixtral.checkpoint.hf import save_hf
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.init import TILE, normal_values
from mixtral.parallel import ParallelDims, full_expert_weight
from mixtral.recipes import load_recipe

from dist_utils import run_ranks

SEED = 1234
# hidden 320 and vocab 600 span several init tiles, so shards cut across tile edges
MODEL = [
    "model.vocab_size=600",
    "model.hidden_size=320",
    "model.intermediate_size=272",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.num_local_experts=4",
    "model.tie_word_embeddings=false",
    "model.max_position_embeddings=64",
    f"train.seed={SEED}",
    "seq_len=32",
    "batch.micro_batch=2",
    "batch.global_batch=8",
]


@dataclass(frozen=True)
class Layout:
    world: int
    overrides: tuple[str, ...]


LAYOUTS = {
    "dp2_zero3": Layout(2, ("parallel.dp=2", "parallel.zero=3")),
    "dp2_zero0": Layout(2, ("parallel.dp=2", "parallel.zero=0")),
    "tp2_sp": Layout(2, ("parallel.tp=2", "parallel.sp=true")),
    "dp2_ep2": Layout(2, ("parallel.dp=2", "parallel.ep=2")),
    "tp2_etp2": Layout(2, ("parallel.tp=2", "parallel.etp=2")),
    "pp2": Layout(2, ("parallel.pp=2",)),
    "cp2": Layout(2, ("parallel.cp=2",)),
    "dp2_tp2_sp_ep2_zero3": Layout(
        4, ("parallel.dp=2", "parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.zero=3")
    ),
    "pp2_dp2_ep2": Layout(4, ("parallel.pp=2", "parallel.dp=2", "parallel.ep=2")),
    "tp2_etp2_ep2_dp2_zero1": Layout(
        4, ("parallel.tp=2", "parallel.etp=2", "parallel.dp=2", "parallel.ep=2", "parallel.zero=1")
    ),
}


def _recipe(overrides: tuple[str, ...] = (), init_from: str | None = None):
    extra = ["model.preset=null", f"model.init_from={init_from}"] if init_from else []
    return load_recipe("cpu-tiny", [*MODEL, *overrides, *extra])


def _global_weights(overrides: tuple[str, ...], init_from: str | None) -> dict[str, torch.Tensor]:
    """This rank's parameters after build + materialize, gathered whole over the layout (not through ShardMap)."""
    recipe = _recipe(overrides, init_from)
    p = recipe.parallel
    dims = ParallelDims(p.dp, p.tp, p.pp, p.cp, p.ep, p.etp, p.sp, world_size=dist.get_world_size())
    meshes = dims.build_meshes("cpu")
    model, parts = build_for_training(recipe, get_backend("cpu"), dims, meshes, torch.device("cpu"))
    assert all(t.is_meta for t in model.parameters())  # nothing allocated before the layout is applied
    materialize(model, parts.model, "cpu", meshes, seed=SEED, init_from=init_from)
    out = {}
    for name, param in parts.model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
        if meshes.expert is not None and ".mlp.experts." in name:
            value = full_expert_weight(value, name.rsplit(".", 1)[1], meshes)
        out[name] = value.clone()
    return out


def _run(names: list[str], init_from: str | None = None) -> dict[str, list[dict]]:
    """Every rank's gathered weights, per layout (gathered to rank 0 as objects)."""
    results = {}
    for name in names:
        weights = _global_weights(LAYOUTS[name].overrides, init_from)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, weights)
        results[name] = everyone
    return results


def _run_layouts(layouts: dict[str, Layout], init_from: str | None = None) -> dict[str, list[dict]]:
    """_run on each world size's ranks for the layouts of that size: one spawn per world size."""
    results: dict = {}
    for world in sorted({layout.world for layout in layouts.values()}):
        names = [name for name, layout in layouts.items() if layout.world == world]
        results.update(run_ranks(_run, world, names, init_from, timeout_s=600)[0])
    return results


def _assert_same_as_one_process(ranks: list[dict], reference: dict[str, torch.Tensor], layout: str) -> None:
    seen = set()
    for rank, weights in enumerate(ranks):
        for name, value in weights.items():
            assert torch.equal(value, reference[name]), f"{layout}: rank {rank} holds another {name}"
            seen.add(name)
    assert seen == set(reference), f"{layout}: no rank holds {set(reference) - seen}"


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    model = Mixtral(_recipe().model_config())
    model.init_weights(seed=SEED)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_random_init_is_the_same_global_weights_under_every_layout(one_process):
    for layout, ranks in _run_layouts(LAYOUTS).items():
        _assert_same_as_one_process(ranks, one_process, layout)


@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_checkpoint_is_read_into_every_layout(tmp_path, fmt):
    """A checkpoint loaded after the layout: every rank's shards are the checkpoint's values (the ranks of a
    pipeline read different tensors, so no read may wait for the others)."""
    from mixtral.checkpoint.convert import write
    from mixtral.checkpoint.loading import open_source

    model = Mixtral(_recipe().model_config())
    model.init_weights(seed=99)
    save_hf(model, tmp_path / "hf")
    if fmt == "native":
        write("native", open_source(tmp_path / "hf")[1], tmp_path / "native")
    expected = {name: p.detach() for name, p in model.named_parameters()}
    layouts = {name: LAYOUTS[name] for name in ("dp2_zero3", "tp2_etp2", "pp2", "pp2_dp2_ep2", "dp2_tp2_sp_ep2_zero3")}
    for layout, ranks in _run_layouts(layouts, str(tmp_path / fmt)).items():
        _assert_same_as_one_process(ranks, expected, layout)


def test_init_values_do_not_depend_on_the_box_they_are_drawn_in():
    shape = (3, 2 * TILE + 7, TILE + 5)
    whole = normal_values(5, "w", shape, tuple(slice(0, n) for n in shape), 0.02)
    box = (slice(1, 3), slice(TILE - 3, 2 * TILE + 2), slice(4, TILE + 5))
    assert torch.equal(normal_values(5, "w", shape, box, 0.02), whole[box])
    assert not torch.equal(normal_values(6, "w", shape, box, 0.02), whole[box])  # the seed matters
    assert abs(whole.std().item() - 0.02) < 1e-3 and abs(whole.mean().item()) < 1e-3


def test_materialize_fills_buffers_and_refuses_a_checkpoint_of_another_shape(tmp_path):
    config = _recipe().model_config()
    other = Mixtral(config.replace(intermediate_size=136))
    other.init_weights(seed=1)
    save_hf(other, tmp_path / "hf")
    model = build_on_meta(config, dtype=torch.bfloat16)
    with pytest.raises(
        MixtralError,
        match=r"parameter 'layers.0.mlp.experts.gate_up_proj' has shape \[4, 272, 320\] "
        r"there but the model's is \[4, 544, 320\]",
    ):
        materialize(model, model, "cpu", init_from=tmp_path / "hf")
    model = build_on_meta(config, dtype=torch.bfloat16)
    materialize(model, model, "cpu", seed=3)
    reference = Mixtral(config)
    reference.init_weights(seed=3)
    assert model.rope_cos.dtype == torch.bfloat16
    assert torch.equal(model.rope_cos, reference.rope_cos.to(torch.bfloat16))
    assert torch.equal(model.layers[1].mlp.experts.down_proj, reference.layers[1].mlp.experts.down_proj.bfloat16())


def test_every_checkpoint_format_reads_any_box(tmp_path):
    """Loading reads each rank's pieces as boxes: every format returns exactly that part of the parameter (HF
    through safetensors slices across its per-expert tensors, native through DCP boxes, Megatron from its fused
    tensors)."""
    from mixtral.checkpoint.convert import write
    from mixtral.checkpoint.loading import open_source

    model = Mixtral(_recipe(("model.hidden_size=64", "model.intermediate_size=48")).model_config())
    model.init_weights(seed=2)
    save_hf(model, tmp_path / "hf", max_shard_bytes=200_000)
    write("native", open_source(tmp_path / "hf")[1], tmp_path / "native")
    write("megatron", open_source(tmp_path / "hf")[1], tmp_path / "megatron")
    gen = torch.Generator().manual_seed(0)

    def cut(size: int) -> slice:
        start = int(torch.randint(size, (), generator=gen))
        return slice(start, int(torch.randint(start + 1, size + 1, (), generator=gen)))

    for fmt in ("hf", "native", "megatron"):
        source = open_source(tmp_path / fmt)[1]
        for name, param in model.named_parameters():
            for _ in range(3):
                box = tuple(cut(size) for size in param.shape)
                assert torch.equal(source.read_box(name, box), param.detach()[box]), (fmt, name, box)
                if param.dim() == 3:  # one expert, as loading reads stacks
                    expert = int(torch.randint(param.shape[0], (), generator=gen))
                    box = (slice(expert, expert + 1), *box[1:])
                    assert torch.equal(source.read_box(name, box), param.detach()[box]), (fmt, name, box)
