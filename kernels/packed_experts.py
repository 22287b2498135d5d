"""Expert GEMMs on weights laid out once for oneDNN, for compiled generation on the CPU.

torch._grouped_mm on the CPU multiplies each expert's segment with at::mm, which lays the weight out for oneDNN again
on every call, and in fp32 at a few rows runs MKL's GEMM about once per row. A weight packed once
(mkldnn._reorder_linear_weight, what inductor's freezing does for nn.Linear) skips both: 8 experts x 2816 x 512,
2 rows each, fp32 7.9 -> 2.6 ms, bf16 1.7 -> 1.2 ms; 1176 rows each, fp32 188 -> 130 ms (2-core Zen 4, measured).
The packed copies live beside the weights (their memory again), so this is for generation only, where the weights
stay fixed (Backend.compile(inference=True)): a weight changed in place afterwards is not seen.
"""

from __future__ import annotations

import functools

import torch

from mixtral.kernels import reference


@functools.cache  # asked on every call of the grouped GEMM: probe once per dtype
def available(dtype: torch.dtype) -> bool:
    """oneDNN is built in and multiplies this dtype natively here."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedGroupedMM:
    """grouped_mm(x, w, offs) (reference.grouped_mm's contract: w [E, K, N], x's rows grouped by expert at offs) with
    each expert's weight packed at its first use and kept, keyed by where the weight lives. Not by its version
    counter: a frozen graph passes the same weight as another tensor with a counter of its own."""

    def __init__(self) -> None:
        self.packed: dict[tuple, list[torch.Tensor]] = {}

    def pack(self, w: torch.Tensor) -> list[torch.Tensor]:
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)
        if key not in self.packed:
            self.packed[key] = [torch.ops.mkldnn._reorder_linear_weight(w[e].t().contiguous())
                                for e in range(w.shape[0])]
        return self.packed[key]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not available(x.dtype) or w.dtype != x.dtype:
            return reference.grouped_mm(x, w, offs)
        out = x.new_empty(x.shape[0], w.shape[-1])
        start = 0
        for weight, end in zip(self.pack(w), offs.tolist()):
            if end > start:
                out[start:end] = torch.ops.mkldnn._linear_pointwise(x[start:end], weight, None, "none", [None], "")
            start = end
        return out
