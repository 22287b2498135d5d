"""The Huawei Ascend backend (torch_npu): fused attention, grouped matmul, MoE permute, norms, RoPE, SwiGLU; HCCL.

The adapters below translate our op contract (mixtral.kernels.reference) into torch_npu's fused ops. They take
the vendor function as their first argument, so tests run them on the CPU against tests/vendor_sim.py.
Sources: the torch_npu API reference on hiascend.com (Pytorch 7.0.0 apilist: npu_fusion_attention,
npu_grouped_matmul, npu_rms_norm, npu_swiglu), the CANN aclnn pages aclnnMoeTokenPermute /
aclnnMoeTokenUnpermute, the sparse_mode introduction of Ascend ops-transformer, and MindSpeed's
docs/ops/npu_rotary_position_embedding.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from mixtral.backend import Availability, Backend, Capabilities, Device, Ops, hookimpl, module_available, peak_by_name
from mixtral.kernels import blocked_cross_entropy, native, reference

CAUSAL_SPARSE_MODE = 2  # leftUpCausal: the kernel builds the causal mask from a compressed 2048 x 2048 triangle
LAYOUTS = ("BNSD", "BSND")
HALF_DTYPES = (torch.float16, torch.bfloat16)  # npu_fusion_attention's query / key / value dtypes
FUSED_OPS = (
    "npu_fusion_attention",
    "npu_grouped_matmul",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    "npu_rms_norm",
    "npu_rotary_position_embedding",
    "npu_swiglu",
)


@functools.lru_cache(maxsize=8)
def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The atten_mask sparse_mode 2 wants: 2048 x 2048 bool, True (masked) strictly above the diagonal."""
    return torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1)


def attention(
    fusion_attention: Callable[..., tuple],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    *,
    layout: str = "BNSD",
) -> torch.Tensor:
    """npu_fusion_attention(query, key, value, head_num, input_layout, ...)[0].

    Conversions: head_num is the query's head count (GQA is native: key heads divide it); the kernel's
    scale defaults to 1.0, so 1/sqrt(D) is always passed; atten_mask is True where a score is MASKED OUT,
    the opposite of ours, in one of the shapes BNSS, B1SS, 11SS or SS; causal uses sparse_mode 2 with the
    compressed triangle; the first of the seven outputs is the attention, in the input layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if q.dtype not in HALF_DTYPES:  # the kernel takes fp16 and bf16 only: fp32 runs torch's SDPA on the NPU
        return native.attention(q, k, v, mask, causal, scale)
    b, heads, s, d = q.shape
    t = k.shape[-2]
    extra = {}
    if mask is not None:
        if causal:
            mask = mask & torch.ones(s, t, dtype=torch.bool, device=q.device).tril()
        keep = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(-1, -1, s, t)
        if keep.shape[1] != 1:  # 1NSS is not a documented shape
            keep = keep.expand(b, heads, s, t)
        extra = {"atten_mask": ~keep, "sparse_mode": 0}
    elif causal:
        extra = {"atten_mask": compressed_causal_mask(q.device), "sparse_mode": CAUSAL_SPARSE_MODE}
    if layout == "BSND":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = fusion_attention(q, k, v, heads, layout, scale=d**-0.5 if scale is None else scale, **extra)[0]
    return out.transpose(1, 2) if layout == "BSND" else out


def group_list(offs: torch.Tensor, group_list_type: int) -> torch.Tensor:
    """Our cumulative int32 offsets as npu_grouped_matmul's int64 group_list: type 0 cumulative, type 1 counts."""
    ends = offs.to(torch.int64)
    if group_list_type == 0:
        return ends
    if group_list_type == 1:
        return torch.diff(ends, prepend=ends.new_zeros(1))
    raise ValueError(f"group_list_type must be 0 (cumsum) or 1 (counts), not {group_list_type}")


def grouped_mm(
    grouped_matmul: Callable[..., list],
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    *,
    group_list_type: int = 0,
) -> torch.Tensor:
    """npu_grouped_matmul([x], [w], group_list=..., split_item=3, group_type=0)[0].

    One x and one y tensor (split_item 3) split on the M axis (group_type 0) by group_list; w is one 3-D
    [G, K, N] tensor. Zero-row groups are allowed. x and w share a dtype (fp16, bf16, or fp32 with single tensors).
    The split must cover x exactly, so rows past the last group (expert parallelism's padding) are cut off and
    their zero outputs padded back; counts (group_list_type 1) need two groups, so one group goes as its end.
    """
    rows = int(offs[-1])
    kind = group_list_type if w.shape[0] > 1 else 0
    if rows == 0:
        return x.new_zeros(x.shape[0], w.shape[-1])
    y = grouped_matmul(
        [x[:rows]], [w], group_list=group_list(offs, kind), split_item=3, group_type=0, group_list_type=kind
    )[0]
    return F.pad(y, (0, 0, 0, x.shape[0] - rows))


def inverse_permutation(perm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    positions = torch.arange(perm.numel(), device=perm.device, dtype=dtype)
    return torch.empty_like(positions).scatter_(0, perm.long(), positions)


def permute(
    token_permute: Callable[..., tuple], x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_moe_token_permute(tokens, indices) -> (permuted_tokens, sorted_indices).

    The vendor's sorted_indices[pair] is the output row of each flattened (token, k) pair: the inverse of
    our order[row] = pair, so it is inverted here. Counts per expert are not returned by the op.
    """
    rows, sorted_indices = token_permute(x, expert_ids)
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts)
    return rows, inverse_permutation(sorted_indices, torch.int64), counts


def unpermute(
    token_unpermute: Callable[..., torch.Tensor], rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs).

    sorted_indices is int32 in the vendor's pair -> row form; probs must share the tokens' dtype, so both go
    to fp32 (our weights are fp32 and the contract sums in fp32) and the result returns to the rows' dtype.
    """
    sorted_indices = inverse_permutation(order, torch.int32)
    return token_unpermute(rows.float(), sorted_indices, weights.float()).to(rows.dtype)


def rms_norm(npu_rms_norm: Callable[..., tuple], x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """npu_rms_norm(self, gamma, epsilon) -> (y, rstd); gamma must have self's dtype."""
    return npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


def rope(
    rotary_position_embedding: Callable[..., torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """npu_rotary_position_embedding(x, cos, sin, mode=0): mode 0 is rotate-half; cos / sin 4-D (11SD for BNSD
    x), x's dtype."""
    return rotary_position_embedding(x, cos[None, None].to(x.dtype), sin[None, None].to(x.dtype), mode=0)


def swiglu(npu_swiglu: Callable[..., torch.Tensor], gate_up: torch.Tensor) -> torch.Tensor:
    """npu_swiglu(input, dim=-1) = swish(A) * B with A the first half: gate first, as ours. Needs a contiguous input."""
    return npu_swiglu(gate_up.contiguous(), dim=-1)


def make_ops(torch_npu: ModuleType | object) -> Ops:
    """The NPU op table from torch_npu (the real module, or a simulation with the same functions in tests)."""
    return Ops(
        attention=functools.partial(attention, torch_npu.npu_fusion_attention),
        linear=F.linear,
        router=reference.router,
        grouped_mm=functools.partial(grouped_mm, torch_npu.npu_grouped_matmul),
        permute=functools.partial(permute, torch_npu.npu_moe_token_permute),
        unpermute=functools.partial(unpermute, torch_npu.npu_moe_token_unpermute),
        rms_norm=functools.partial(rms_norm, torch_npu.npu_rms_norm),
        rope=functools.partial(rope, torch_npu.npu_rotary_position_embedding),
        swiglu=functools.partial(swiglu, torch_npu.npu_swiglu),
        cross_entropy=blocked_cross_entropy.cross_entropy,
        int8_linear=reference.int8_linear,
        int8_grouped_mm=reference.int8_grouped_mm,
    )


class NPUBackend(Backend):
    def probe(self) -> Availability:
        found = module_available("torch_npu", self.install_hint)
        if not found.ok:
            return found
        if not torch.npu.is_available():
            return Availability(False, "torch_npu is installed but no Ascend NPU is visible (check the CANN driver)")
        return Availability(True)

    def build_ops(self) -> Ops:
        import torch_npu

        return make_ops(torch_npu)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def peak_flops(self, device: torch.device, dtype: torch.dtype) -> float | None:
        """Huawei's fp16 / bf16 cube peak for the Ascend 910B family, by torch.npu.get_device_name()."""
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        return peak_by_name(torch.npu.get_device_name(), {"910B": 313e12})


@hookimpl
def mixtral_register_backends(register) -> None:
    register(
        NPUBackend(
            name="npu",
            device_type="npu",
            dist_backend="hccl",
            capabilities=Capabilities(
                dynamic_shapes=True, preferred_dispatcher="dropless", fused_ops=FUSED_OPS, auto_priority=20
            ),
            # HCCS inside the node, 200 Gb/s RoCE per NPU
            planner_devices=(Device("910b", "Huawei Ascend 910B 64 GB", "npu", 64, 313, 0.32, 175, 22, 8, 8),),
            install_hint="pip install 'mixtral-run[npu]' (torch_npu matching your torch and CANN)",
        )
    )
