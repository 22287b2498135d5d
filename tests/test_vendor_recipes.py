"""Every vendor recipe loads, reproduces its guide's layout, and validates on the guide's device count."""

from __future__ import annotations

import pytest

from mixtral.planner import GiB
from mixtral.recipe_command import validate
from mixtral.recipes import RECIPES_DIR, find_recipe, load_recipe

# name: (devices, device, (dp, tp, pp, cp, ep, etp), dispatcher, the guide its header cites)
VENDOR = {
    "cuda-8x7b-tp1ep8pp4": (32, "h100", (8, 1, 4, 1, 8, 1), "dropless", "train_mixtral_8x7b_distributed.sh"),
    "cuda-8x7b-infer-tp1ep1pp2": (2, "h100", (1, 1, 2, 1, 1, 1), "dropless", "run_text_generation_server.py"),
    "cuda-8x22b-tp4pp4ep8": (256, "h100", (16, 4, 4, 1, 8, 1), "dropless", "run_mixtral_8x22B.sh"),
    "gaudi2-8x7b-32hpu-capacity-bins": (32, "gaudi2", (4, 8, 1, 1, 1, 8), "capacity_bins", "pretrain_mixtral.sh"),
    "gaudi2-8x7b-32hpu-tp-sp-allgather-extp": (
        32,
        "gaudi2",
        (4, 8, 1, 1, 8, 1),
        "capacity_bins",
        "pretrain_mixtral.sh",
    ),
    "gaudi2-8x7b-32hpu-dp-ep": (32, "gaudi2", (32, 1, 1, 1, 8, 1), "capacity_bins", "pretrain_mixtral.sh"),
    "gaudi2-8x7b-32hpu-dp-ep-allgather-extp": (
        32,
        "gaudi2",
        (16, 2, 1, 1, 8, 1),
        "capacity_bins",
        "pretrain_mixtral.sh",
    ),
    "ascend-8x7b-tp8pp2cp4": (64, "910b", (1, 8, 2, 4, 1, 8), "dropless", "pretrain_mixtral_8x7b_ptd.sh"),
    "tpu-v5p-8x22b-spmd": (256, "v5p", (256, 1, 1, 1, 1, 1), "capacity", "MoE_study"),
}


def test_every_recipe_file_is_covered():
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} - {"cpu-tiny"} == set(VENDOR)


@pytest.mark.parametrize("name", sorted(VENDOR))
def test_vendor_recipe_validates_on_its_devices(name):
    devices, device, dims, dispatcher, source = VENDOR[name]
    path = find_recipe(name)
    assert source in path.read_text().split("\nmodel:")[0]  # the header cites the guide it reproduces
    recipe = load_recipe(path)
    p = recipe.parallel
    assert (p.dp, p.tp, p.pp, p.cp, p.ep, p.etp) == dims and p.world_size == devices
    assert recipe.moe.dispatcher == dispatcher
    assert (recipe.hardware.device, recipe.hardware.devices) == (device, devices)
    lines = []
    memory, time = validate(recipe, out=lines.append)
    assert memory.fits and memory.device.name == device and memory.total <= memory.device.memory_gib * GiB
    assert "memory per device" in "\n".join(lines)
    assert (time is None) == (recipe.mode == "inference")


def test_vendor_settings_are_recipe_keys():
    """The guides' settings that once lived in comments are typed keys now, read by the planner."""
    ascend = load_recipe("ascend-8x7b-tp8pp2cp4")
    assert (ascend.parallel.cp_algo, ascend.schedule.decay_steps, ascend.hardware.nodes) == ("ring", 1280, 8)
    assert load_recipe("cuda-8x7b-tp1ep8pp4").schedule.decay_steps == 320000
    assert load_recipe("cuda-8x7b-infer-tp1ep1pp2").mode == "inference"
    assert load_recipe("tpu-v5p-8x22b-spmd").hardware.nodes == 64
    for path in RECIPES_DIR.glob("*.yaml"):
        assert "schema-pending" not in path.read_text(), path


def test_mlperf_tpu_recipe_settings():
    r = load_recipe("tpu-v5p-8x22b-spmd")
    assert r.model_config().num_hidden_layers == 56 and r.model_config().hidden_size == 6144
    assert (r.seq_len, r.batch.global_batch, r.batch.micro_batch, r.train.steps, r.train.seed) == (
        32768,
        256,
        1,
        250,
        4321,
    )
    assert (r.optimizer.lr, r.optimizer.weight_decay, r.optimizer.grad_clip) == (2e-5, 0.1, 1.0)
    assert (r.schedule.name, r.schedule.warmup_fraction) == ("warmup_hold", 0.25)
    assert (r.moe.capacity_factor, r.moe.capacity_per) == (1.25, "sequence")
    assert (r.eval.interval, r.eval.unit, r.eval.target_loss) == (24 * 1024 * 2048, "tokens", 1.8)
    assert (r.parallel.zero, r.backend) == (3, "xla")


def test_gaudi_capacity_bins_settings():
    r = load_recipe("gaudi2-8x7b-32hpu-capacity-bins")
    bins = r.moe.capacity_bins
    assert (bins.num_bins, bins.exp_base, bins.alignment, bins.optimize_interval) == (10, 1.5, 64, 300)
    assert r.moe.capacity_factor is None and r.parallel.sp and r.parallel.zero == 1
    assert (r.seq_len, r.precision) == (32768, "bf16_master")
    assert r.activation_checkpointing == "moe" and r.backend_options == {"fused_sdpa_recompute": True}
