"""The memory estimate against hand arithmetic, the cost model's parts, and the layout search."""

from __future__ import annotations

import pytest

from mixtral.config import ModelConfig
from mixtral.errors import MixtralError
from mixtral.planner import (
    RESERVE,
    GiB,
    Workload,
    check_layout,
    check_memory,
    estimate_memory,
    get_device,
    layer_activations,
    plan_layouts,
    stage_parameters,
    step_time,
)

M8x7B = ModelConfig.preset("8x7b")
H100 = get_device("h100")
# Megatron's recommended training layout: TP1 EP8 PP4 on 32 GPUs (dp 8), seq 4096, global batch 256.
MEGATRON = Workload(dp=8, pp=4, ep=8, zero=1, global_batch=256, seq_len=4096, precision="bf16_master")

# Hand arithmetic for Mixtral 8x7B (h 4096, F 14336, 32 layers, 32 heads, 8 kv heads, head_dim 128, V 32000).
ATTENTION = 4096 * 128 * 2 * (32 + 8)  # q, o: 4096 x 4096; k, v: 4096 x 1024  -> 41,943,040
NORMS_ROUTER = 2 * 4096 + 4096 * 8  # two RMSNorms and the router          -> 40,960
EXPERTS = 8 * 3 * 4096 * 14336  # w1, w3, w2 of 8 experts              -> 1,409,286,144
EMBED = 32000 * 4096  # embedding, and the untied lm head   -> 131,072,000


def test_parameter_count_is_46_7_billion():
    assert M8x7B.num_parameters == 32 * (ATTENTION + NORMS_ROUTER + EXPERTS) + 2 * EMBED + 4096 == 46_702_792_704


def test_per_device_parameters_tp1_ep8_pp4():
    first = stage_parameters(M8x7B, MEGATRON, 0)
    last = stage_parameters(M8x7B, MEGATRON, 3)
    assert first == (8 * (ATTENTION + NORMS_ROUTER) + EMBED, 8 * EXPERTS // 8)
    assert last == (8 * (ATTENTION + NORMS_ROUTER) + EMBED + 4096, 8 * EXPERTS // 8)
    assert sum(last) == 1_876_234_240  # 1.88 B parameters on a last-stage GPU
    # Every rank's shard added up is the whole model: dense parts replicated over dp, experts split by ep.
    total = sum(stage_parameters(M8x7B, MEGATRON, s)[0] + stage_parameters(M8x7B, MEGATRON, s)[1] * 8 for s in range(4))
    assert total == M8x7B.num_parameters


def test_memory_rows_tp1_ep8_pp4_by_hand():
    estimate = estimate_memory(M8x7B, MEGATRON, H100)
    rows = dict(estimate.rows)
    assert estimate.stage == 0  # 4 micro-batches in flight outweigh the lm head
    dense, expert = 8 * (ATTENTION + NORMS_ROUTER) + EMBED, EXPERTS
    assert rows["weights"] == 2 * (dense + expert)  # bf16 weights: 3.75 GB
    assert rows["gradients"] == 4 * (dense + expert)  # fp32 main grads
    # distributed optimizer: fp32 master, m, v sharded over dp = 8 (dense) and edp = 8 / 8 = 1 (experts)
    assert rows["optimizer states"] == pytest.approx(12 * dense / 8 + 12 * expert)
    per_layer = layer_activations(M8x7B, MEGATRON)
    # seq 4096, micro-batch 1, no sp: attention 2 B x (2 h T + T (2 x 40 heads x 128) / tp)
    assert per_layer["attention"] == 2 * (2 * 4096 * 4096 + 4096 * 10240)
    # moe 2 B x (2 h T + 2 T (2 h + 3 F)) + router logits and probabilities in fp32
    assert per_layer["moe"] == 2 * (2 * 4096 * 4096 + 2 * 4096 * (2 * 4096 + 3 * 14336)) + 8 * 4096 * 8
    assert rows["activations"] == 4 * 8 * (per_layer["attention"] + per_layer["moe"])  # 1F1B: pp = 4 in flight
    assert rows["reserve (runtime, buffers)"] == RESERVE * 80 * GiB
    assert estimate.total == sum(rows.values()) and estimate.fits


def test_checkpointing_and_zero_lower_memory():
    totals = [
        estimate_memory(M8x7B, MEGATRON.replace(checkpointing=m), H100).total
        for m in ("none", "selective", "moe", "full")
    ]
    assert totals == sorted(totals, reverse=True)
    by_zero = [estimate_memory(M8x7B, MEGATRON.replace(zero=z, ep=1), H100).total for z in (0, 1, 2, 3)]
    assert by_zero == sorted(by_zero, reverse=True)
    full = dict(estimate_memory(M8x7B, MEGATRON.replace(checkpointing="full"), H100).rows)
    act = layer_activations(M8x7B, MEGATRON)
    assert full["activations"] == 4 * (8 * act["input"] + act["attention"] + act["moe"])


def test_sequence_parallel_and_capacity_padding_in_activations():
    base = Workload(tp=8, etp=8, seq_len=32768, dispatcher="capacity", capacity_factor=1.25)
    act, act_sp = layer_activations(M8x7B, base), layer_activations(M8x7B, base.replace(sp=True))
    assert act_sp["input"] == act["input"] / 8
    rows = 2 * 32768 * 1.25  # top-2 rows of all 32768 tokens (gathered over etp), padded to capacity 1.25
    assert act_sp["moe"] == 2 * (2 * 4096 * 4096 + rows * (2 * 4096 + 3 * 14336 / 8)) + 8 * 32768 * 8


def test_inference_kv_cache_and_weights():
    w = Workload(pp=2, micro_batch=4, global_batch=4, seq_len=1024, precision="bf16", mode="inference")
    rows = dict(estimate_memory(M8x7B, w, H100).rows)
    assert rows["KV cache"] == 2 * 16 * 8 * 128 * 1024 * 4 * 2  # k, v x 16 layers x 8 kv heads x d x len x batch x bf16
    assert rows["weights"] == 2 * sum(stage_parameters(M8x7B, w, 1))
    assert "gradients" not in rows and "optimizer states" not in rows


def test_too_big_names_the_dimension_and_the_fix():
    with pytest.raises(
        MixtralError,
        match=r"does not fit on NVIDIA H100.*largest part is activations.*"
        r"activation_checkpointing=full \(\d+\.\d GiB\)",
    ):
        check_memory(M8x7B, MEGATRON.replace(pp=1, dp=32), H100)
    alone = Workload(seq_len=1024, precision="bf16", mode="inference")
    with pytest.raises(MixtralError, match=r"largest part is weights.*use more devices: parallel.pp=2 on 2 devices"):
        check_memory(M8x7B, alone, H100)


def test_step_time_parts_follow_the_documented_model():
    t = step_time(M8x7B, MEGATRON, H100)
    flops = M8x7B.flops_per_token(4096) * 256 * 4096
    assert t.parts["compute"] == pytest.approx(flops / 32 / (989e12 * 0.45))
    assert t.parts["tp"] == 0 and t.parts["cp"] == 0
    m = 256 // 8
    # 4 all-to-alls per layer per micro-batch, 8 layers, 2 x 4096 tokens x 4096 x 2 B, 7/8 leave, NVLink
    assert t.parts["ep"] == pytest.approx(8 * m * 4 * 2 * 4096 * 4096 * 2 * 7 / 8 / 360e9)
    work = t.parts["compute"] + t.parts["ep"]
    assert t.parts["pp bubble + sends"] == pytest.approx(work * 3 / m + 2 * m * 4096 * 4096 * 2 / 45e9)
    assert t.total == pytest.approx(sum(t.parts.values())) and 0 < t.mfu < 0.45
    # twice the micro-batches halve the bubble's share
    longer = step_time(M8x7B, MEGATRON.replace(global_batch=512), H100)
    assert longer.parts["pp bubble + sends"] / longer.total < t.parts["pp bubble + sends"] / t.total


def test_plan_returns_only_fitting_layouts_sorted_by_cost():
    plans = plan_layouts(M8x7B, H100, 32, 4096, 256)
    assert len(plans) > 10
    times = [p.time.total for p in plans]
    assert times == sorted(times)
    for p in plans:
        w = p.workload
        assert w.world_size == 32 and p.memory.fits and p.memory.total <= 80 * GiB
        check_layout(M8x7B, w, 32)
        assert estimate_memory(M8x7B, w, H100).total == p.memory.total
    layouts = {(p.workload.dp, p.workload.tp, p.workload.pp, p.workload.ep) for p in plans}
    assert (8, 1, 4, 8) in layouts  # Megatron's recommendation is among them
    # 46.7 B parameters replicated on 32 GPUs fit only when ZeRO-3 shards the weights too
    fsdp = [p.workload for p in plans if (p.workload.dp, p.workload.tp, p.workload.pp, p.workload.ep) == (32, 1, 1, 1)]
    assert [w.zero for w in fsdp] == [3]
    assert not estimate_memory(M8x7B, fsdp[0].replace(zero=1), H100).fits


def test_plan_spmd_device_and_nothing_fits():
    plans = plan_layouts(ModelConfig.preset("8x22b"), get_device("v5p"), 256, 32768, 256)
    assert plans and all(p.workload.pp == 1 and p.workload.cp == 1 and p.workload.zero == 3 for p in plans)
    assert all(p.workload.dispatcher == "capacity" and p.workload.capacity_factor == 1.25 for p in plans)
    assert plan_layouts(ModelConfig.preset("8x22b"), H100, 2, 4096, 2) == []
