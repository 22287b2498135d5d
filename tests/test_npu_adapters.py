"""The Ascend adapters (backends/npu.py) against kernels/reference, on the CPU through tests/vendor_sim.py's
simulations.

fp32 with tolerance 1e-5 (relative and absolute) unless stated; npu_fusion_attention takes fp16 and bf16 only, so its
cases run in both, against the fp32 reference on the same rounded inputs (vendor_sim.HALF); integer outputs exactly.
"""

from __future__ import annotations

import pytest
import torch

from mixtral.backend import registry
from mixtral.backends import npu
from mixtral.kernels import reference
from mixtral.model.rope import rope_tables
from tests import vendor_sim as sim
from tests.vendor_sim import ATTENTION_CASES, FP32, HALF, qkv, random_mask

NPU = sim.torch_npu
OPS = npu.make_ops(NPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", npu.LAYOUTS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(case, layout, dtype) -> None:
    s, t, kv_heads, causal, mask = ATTENTION_CASES[case]
    q, k, v = qkv(s, t, kv_heads=kv_heads, dtype=dtype)
    scale = 0.2 if case == "mha" else None
    want = reference.attention(q.float(), k.float(), v.float(), mask=mask, causal=causal, scale=scale)
    got = npu.attention(NPU.npu_fusion_attention, q, k, v, mask=mask, causal=causal, scale=scale, layout=layout)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **HALF[dtype])


def test_fp32_attention_runs_sdpa_not_the_half_precision_kernel() -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("npu_fusion_attention takes fp16 and bf16 only")

    q, k, v = qkv(5, 13)
    mask = random_mask(2, 1, 5, 13)
    torch.testing.assert_close(
        npu.attention(refuse, q, k, v, mask=mask), reference.attention(q, k, v, mask=mask), **FP32
    )
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        NPU.npu_fusion_attention(q, k, v, 6, "BNSD", scale=0.25)


def test_causal_uses_the_compressed_mask_and_sparse_mode_2() -> None:
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return NPU.npu_fusion_attention(*args, **kwargs)

    q, k, v = qkv(11, 11, dtype=torch.bfloat16)
    npu.attention(spy, q, k, v, causal=True)
    assert seen["sparse_mode"] == 2 and seen["atten_mask"].shape == (2048, 2048)
    assert seen["atten_mask"] is npu.compressed_causal_mask(q.device)  # built once per device


def test_wrong_attention_calls_fail() -> None:
    """Mistakes an adapter could make, each caught by the simulation: polarity, scale, layout, mask shape."""
    q, k, v = qkv(11, 13, dtype=torch.bfloat16)
    mask = random_mask(2, 1, 11, 13)
    want = reference.attention(q.float(), k.float(), v.float(), mask=mask)
    tolerance = HALF[torch.bfloat16]
    as_is = NPU.npu_fusion_attention(q, k, v, 6, "BNSD", atten_mask=mask | (torch.arange(13) == 1), scale=0.25)[0]
    assert not torch.allclose(as_is.float(), want, **tolerance)  # our True = attend passed where True = masked out
    no_scale = NPU.npu_fusion_attention(q, k, v, 6, "BNSD", atten_mask=~mask)[0]  # the kernel's default is 1.0
    assert not torch.allclose(no_scale.float(), want, **tolerance)
    torch.testing.assert_close(
        NPU.npu_fusion_attention(q, k, v, 6, "BNSD", atten_mask=~mask, scale=0.25)[0].float(), want, **tolerance
    )
    with pytest.raises(ValueError, match="head_num 6 does not match"):
        NPU.npu_fusion_attention(q, k, v, 6, "BSND", scale=0.25)  # BNSD tensors declared BSND
    with pytest.raises(ValueError, match="is not BNSS, B1SS, 11SS or SS"):
        NPU.npu_fusion_attention(q, k, v, 6, "BNSD", atten_mask=~mask[0])  # 3-D
    with pytest.raises(ValueError, match="compressed 2048 x 2048"):
        NPU.npu_fusion_attention(
            q, k, v, 6, "BNSD", atten_mask=~torch.ones(11, 13, dtype=torch.bool).tril(), sparse_mode=2
        )


def test_group_list_conversion() -> None:
    offs = torch.tensor([3, 3, 10, 10, 15], dtype=torch.int32)
    cumulative, counts = npu.group_list(offs, 0), npu.group_list(offs, 1)
    assert cumulative.dtype == counts.dtype == torch.int64
    assert cumulative.tolist() == [3, 3, 10, 10, 15] and counts.tolist() == [3, 0, 7, 0, 5]
    with pytest.raises(ValueError, match="group_list_type must be 0"):
        npu.group_list(offs, 2)


GROUPS = {
    "zeros_inside": [3, 0, 7, 0, 5],
    "leading_empty": [0, 0, 12],
    "last_empty": [4, 4, 0],
    "one_group": [9],
    "all_empty": [0, 0, 0],
}


@pytest.mark.parametrize("padding", [0, 4], ids=["exact", "padded_rows"])  # expert parallelism pads x past the groups
@pytest.mark.parametrize("group_list_type", [0, 1], ids=["cumsum", "counts"])
@pytest.mark.parametrize("case", list(GROUPS))
def test_grouped_mm_matches_reference(case, group_list_type, padding) -> None:
    counts = GROUPS[case]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts) + padding, 32)
    w = torch.randn(len(counts), 24, 32).transpose(
        1, 2
    )  # [G, K, N] viewed from [G, N, K] parameters, as the experts pass it
    got = npu.grouped_mm(NPU.npu_grouped_matmul, x, w, offs, group_list_type=group_list_type)
    rows = sum(counts)  # the reference leaves rows past the groups unwritten; the adapter zeroes them
    torch.testing.assert_close(got[:rows], reference.grouped_mm(x, w, offs)[:rows], **FP32)
    assert got.shape == (x.shape[0], 24) and not got[rows:].any()


def test_wrong_grouped_mm_calls_fail() -> None:
    offs = torch.tensor([3, 3, 10, 10, 15], dtype=torch.int32)
    x, w = torch.randn(15, 8), torch.randn(5, 8, 4)
    with pytest.raises(ValueError, match="counts summing to x's rows"):  # cumulative ends declared as counts
        NPU.npu_grouped_matmul([x], [w], group_list=offs.long(), split_item=3, group_type=0, group_list_type=1)
    with pytest.raises(ValueError, match="the last equal to x's rows"):  # rows past the last group
        NPU.npu_grouped_matmul([torch.randn(17, 8)], [w], group_list=offs.long(), split_item=3, group_type=0)
    with pytest.raises(ValueError, match="needs at least 2 groups"):  # one group as a count
        NPU.npu_grouped_matmul(
            [x], [w[:1]], group_list=torch.tensor([15]), split_item=3, group_type=0, group_list_type=1
        )
    with pytest.raises(TypeError, match="group_list must be int64"):  # our int32 offsets passed unconverted
        NPU.npu_grouped_matmul([x], [w], group_list=offs, split_item=3, group_type=0)
    with pytest.raises(TypeError, match="share a dtype"):
        NPU.npu_grouped_matmul([x.bfloat16()], [w], group_list=offs.long(), split_item=3, group_type=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k, used", [(2, (0, 2, 3, 5)), (1, (3,))], ids=["empty_experts", "one_expert"])
def test_permute_unpermute_match_reference(dtype, top_k, used) -> None:
    x = torch.randn(13, 24).to(dtype)
    ids = torch.tensor(used)[torch.rand(13, len(used)).topk(top_k).indices]
    weights = torch.rand(13, top_k) + 0.1
    rows, order, counts = OPS.permute(x, ids, 6)
    ref_rows, ref_order, ref_counts = reference.permute(x, ids, 6)
    assert torch.equal(rows, ref_rows) and torch.equal(order, ref_order) and torch.equal(counts, ref_counts)
    assert order.dtype == ref_order.dtype and counts.dtype == ref_counts.dtype
    expert_out = rows * torch.randn(rows.shape[0], 1).to(dtype)
    got, want = OPS.unpermute(expert_out, order, weights), reference.unpermute(expert_out, order, weights)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **FP32)  # both sum in fp32, then round once
    round_trip = OPS.unpermute(rows, order, weights / weights.sum(-1, keepdim=True))
    torch.testing.assert_close(
        round_trip.float(),
        x.float(),
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
    )


def test_wrong_permute_calls_fail() -> None:
    """The vendor's sorted_indices is the inverse of our order: used as-is it scrambles tokens; dtypes are checked."""
    x, ids = torch.randn(13, 24), torch.randint(0, 6, (13, 2))
    rows, sorted_indices = NPU.npu_moe_token_permute(x, ids)
    _, order, _ = reference.permute(x, ids, 6)
    assert not torch.equal(sorted_indices.long(), order)
    halves = torch.full((13, 2), 0.5)
    assert not torch.allclose(reference.unpermute(rows, sorted_indices.long(), halves), x, **FP32)
    with pytest.raises(TypeError, match="sorted_indices must be int32"):
        NPU.npu_moe_token_unpermute(rows, order, halves)
    with pytest.raises(TypeError, match="probs dtype"):
        NPU.npu_moe_token_unpermute(rows.bfloat16(), sorted_indices, halves)


def test_rms_norm_matches_reference() -> None:
    x, w = torch.randn(3, 7, 40), 1 + 0.1 * torch.randn(40)
    torch.testing.assert_close(OPS.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **FP32)
    with pytest.raises(TypeError, match="gamma dtype"):  # fp32 weight with bf16 activations must be cast first
        NPU.npu_rms_norm(x.bfloat16(), w, 1e-5)
    assert OPS.rms_norm(x.bfloat16(), w, 1e-5).dtype == torch.bfloat16


def test_rope_matches_reference() -> None:
    cos, sin = rope_tables(16, 64, 1e6)
    x = torch.randn(2, 3, 9, 16)
    want = reference.rope(x, cos[5:14], sin[5:14])
    torch.testing.assert_close(OPS.rope(x, cos[5:14], sin[5:14]), want, **FP32)
    interleaved = NPU.npu_rotary_position_embedding(x, cos[None, None, 5:14], sin[None, None, 5:14], mode=1)
    assert not torch.allclose(interleaved, want, **FP32)
    with pytest.raises(ValueError, match="must be 4-D"):
        NPU.npu_rotary_position_embedding(x, cos[5:14], sin[5:14])


def test_swiglu_matches_reference() -> None:
    gate_up = torch.randn(17, 2 * 40)
    torch.testing.assert_close(OPS.swiglu(gate_up), reference.swiglu(gate_up), **FP32)
    strided = torch.randn(17, 3 * 40)[:, :80]  # a non-contiguous view: the kernel refuses it, the adapter copies
    with pytest.raises(ValueError, match="non-contiguous"):
        NPU.npu_swiglu(strided)
    torch.testing.assert_close(OPS.swiglu(strided), reference.swiglu(strided), **FP32)
    batched = torch.randn(5, 3, 2 * 8)  # the capacity dispatchers' [E, C, 2F]
    torch.testing.assert_close(OPS.swiglu(batched), reference.swiglu(batched), **FP32)


def test_op_table_is_all_fused() -> None:
    for name, vendor in [
        ("attention", "npu_fusion_attention"),
        ("grouped_mm", "npu_grouped_matmul"),
        ("permute", "npu_moe_token_permute"),
        ("unpermute", "npu_moe_token_unpermute"),
        ("rms_norm", "npu_rms_norm"),
        ("rope", "npu_rotary_position_embedding"),
        ("swiglu", "npu_swiglu"),
    ]:
        op = getattr(OPS, name)
        assert op.func is getattr(npu, name) and op.args == (getattr(NPU, vendor),)
    assert set(registry().backends["npu"].capabilities.fused_ops) == set(npu.FUSED_OPS)


def test_tiny_mixtral_logits_equal_reference_ops() -> None:
    sim.assert_mixtral_matches_reference(OPS)


def test_registered_with_hccl_and_honest_availability() -> None:
    b = registry().backends["npu"]
    assert (b.device_type, b.dist_backend) == ("npu", "hccl")
    if not b.availability.ok:  # this machine: no torch_npu
        assert b.availability.reason.startswith("python package 'torch_npu' is not importable")
        assert b.availability.reason.endswith(b.install_hint)
