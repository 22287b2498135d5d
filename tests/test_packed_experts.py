"""kernels.packed_experts: the experts' grouped GEMM on weights packed once for oneDNN, against the reference."""

from __future__ import annotations

import gc

import pytest
import torch

from mixtral.backend import get_backend
from mixtral.kernels import packed_experts, reference
from mixtral.model import Mixtral

from conftest import small_config

pytestmark = pytest.mark.skipif(not packed_experts.available(torch.float32), reason="PyTorch built without oneDNN")


def frozen(w: torch.Tensor) -> packed_experts.PackedGroupedMM:
    """A PackedGroupedMM that packs w (declared frozen)."""
    grouped_mm = packed_experts.PackedGroupedMM()
    grouped_mm.freeze([w])
    return grouped_mm


def grouped_inputs(counts: list[int], k: int, n: int, dtype: torch.dtype):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), k).to(dtype)
    w = torch.randn(len(counts), n, k).to(dtype).transpose(1, 2)  # [E, K, N] views, as the model passes them
    return x, w, torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.parametrize(
    "counts",
    [[3, 0, 5, 1, 0], [0, 0, 9, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]],
    ids=["uneven", "one-expert", "one-row-each", "no-rows"],
)
def test_fp32_matches_the_reference(counts):
    x, w, offs = grouped_inputs(counts, 48, 40, torch.float32)
    grouped_mm = frozen(w)
    torch.testing.assert_close(
        grouped_mm(x, w, offs), reference.grouped_mm(x, w, offs), rtol=1e-5, atol=1e-5
    )  # fp32, another summation order
    assert len(grouped_mm.packed) == 1


def test_bf16_matches_the_reference():
    """bf16 where oneDNN takes it (packed), else the reference itself: both accumulate in fp32 and round once."""
    x, w, offs = grouped_inputs([4, 0, 7, 2], 64, 96, torch.bfloat16)
    out = frozen(w)(x, w, offs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.grouped_mm(x, w, offs).float(), rtol=2**-7, atol=1e-2)


def test_each_weight_is_packed_once():
    """Packed at first use, then reused (a frozen decode graph passes the same weight as another tensor object)."""
    x, w, offs = grouped_inputs([2, 3], 16, 8, torch.float32)
    _, other, _ = grouped_inputs([1, 1], 16, 8, torch.float32)
    grouped_mm = frozen(w)
    grouped_mm(x, w, offs)
    first = grouped_mm.pack(w)
    assert grouped_mm.pack(w.detach()) is first  # another tensor object, the same weight
    torch.testing.assert_close(grouped_mm(x, other, offs), reference.grouped_mm(x, other, offs), rtol=1e-5, atol=1e-5)
    assert len(grouped_mm.packed) == 1 and grouped_mm.pack(w) is first  # `other` is not frozen: not packed


def test_only_frozen_weights_are_packed_until_released():
    """A weight not declared frozen may change: it is multiplied as it is. Released, its packing goes with it."""
    x, w, offs = grouped_inputs([2, 3], 16, 8, torch.float32)
    grouped_mm = packed_experts.PackedGroupedMM()
    grouped_mm(x, w, offs)
    assert not grouped_mm.packed
    keys = grouped_mm.freeze([w])
    grouped_mm.freeze([w])  # a second model holding the same weights
    grouped_mm(x, w, offs)
    grouped_mm.release(keys)
    assert len(grouped_mm.packed) == 1  # still frozen by the second
    grouped_mm.release(keys)
    assert not grouped_mm.packed and not grouped_mm.frozen
    with torch.no_grad():
        w.mul_(2)  # after release a change is seen
    torch.testing.assert_close(grouped_mm(x, w, offs), reference.grouped_mm(x, w, offs), rtol=1e-5, atol=1e-5)


def test_compiled_generation_uses_them_and_lets_them_go_with_the_model():
    """Every layer's expert weights are frozen for the packed grouped GEMM, and released when the model is freed."""
    model = Mixtral(small_config(), get_backend("cpu"))
    get_backend("cpu").compile(model, dynamic=True, inference=True)
    pointers = [
        w.data_ptr() for layer in model.layers for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
    ]
    assert all(packed_experts.PACKED.frozen[p] == 1 for p in pointers)
    del model
    gc.collect()
    assert not any(p in packed_experts.PACKED.frozen for p in pointers)
