"""Expert GEMMs on weights laid out once for oneDNN, for compiled generation on the CPU.

torch._grouped_mm on the CPU multiplies each expert's segment with at::mm, which lays the weight out for oneDNN again
on every call, and in fp32 at a few rows runs MKL's GEMM about once per row. A weight packed once
(mkldnn._reorder_linear_weight, what inductor's freezing does for nn.Linear) skips both: 8 experts x 2816 x 512,
2 rows each, fp32 7.9 -> 2.6 ms, bf16 1.7 -> 1.2 ms; 1176 rows each, fp32 188 -> 130 ms (2-core Zen 4, measured).
The packed copies live beside the weights (their memory again), so only weights declared frozen are packed
(`PACKED.freeze`, by the CPU backend when it compiles a model for generation), and they go when released.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable

import torch

from mixtral.kernels import fp32_compute


@functools.cache  # asked on every call of the grouped GEMM: probe once per dtype
def available(dtype: torch.dtype) -> bool:
    """oneDNN is built in and multiplies this dtype natively here."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedGroupedMM:
    """grouped_mm(x, w, offs) (reference.grouped_mm's contract: w [E, K, N], x's rows grouped by expert at offs) with
    each frozen expert weight packed at its first use and kept, keyed by where the weight lives. Not by its version
    counter: a frozen graph passes the same weight as another tensor with a counter of its own. Weights not declared
    frozen go to fp32_compute.grouped_mm, as do dtypes oneDNN does not multiply here."""

    def __init__(self) -> None:
        self.packed: dict[tuple, list[torch.Tensor]] = {}
        self.frozen: Counter[int] = Counter()  # data pointers of weights that stay fixed, by how many models hold them

    def freeze(self, weights: Iterable[torch.Tensor]) -> list[int]:
        """Declare weights fixed from now on (a change in place is not seen); returns what to release them by."""
        pointers = [w.data_ptr() for w in weights]
        self.frozen.update(pointers)
        return pointers

    def release(self, pointers: list[int]) -> None:
        """Forget frozen weights whose model is gone (their memory may hold other tensors next) and their packings."""
        self.frozen.subtract(pointers)
        gone = {p for p in pointers if self.frozen[p] <= 0}
        for pointer in gone:
            del self.frozen[pointer]
        self.packed = {key: value for key, value in self.packed.items() if key[0] not in gone}

    def pack(self, w: torch.Tensor) -> list[torch.Tensor]:
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)
        if key not in self.packed:
            self.packed[key] = [
                torch.ops.mkldnn._reorder_linear_weight(w[e].t().contiguous()) for e in range(w.shape[0])
            ]
        return self.packed[key]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not available(x.dtype) or w.dtype != x.dtype or w.data_ptr() not in self.frozen:
            return fp32_compute.grouped_mm(x, w, offs)
        out = x.new_empty(x.shape[0], w.shape[-1])
        start = 0
        for weight, end in zip(self.pack(w), offs.tolist()):
            if end > start:
                out[start:end] = torch.ops.mkldnn._linear_pointwise(x[start:end], weight, None, "none", [None], "")
            start = end
        return out


PACKED = PackedGroupedMM()  # one per process: frozen weights are told apart by where they live


@torch.library.custom_op("mixtral::packed_grouped_mm", mutates_args=())
def packed_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """PACKED as one node of a compiled inference graph (no autograd through it): its loop over the segments on the
    host breaks no graph."""
    return PACKED(x, w, offs)


@packed_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])
