"""SIMULATIONS of Intel Gaudi (habana_frameworks) and Huawei Ascend (torch_npu) fused ops, in plain torch.

Not vendor code and not fast. Each op is re-implemented from the vendor's documentation (sources in each
docstring): its argument order, layouts, mask polarity, default scale, dtype rules and returned tuple, and it
rejects what the documentation rejects. The backend adapters are tested against these on the CPU, so an
adapter that passes the wrong layout, polarity, scale or group-list format fails its test.
Randomness (dropout) is not simulated.
"""

from __future__ import annotations

import math

import torch

NO_BAND = 2147483647  # npu_fusion_attention's default pre_tockens / next_tockens


def _softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """fp32 softmax(q k^T * scale + bias) v for q [B, N1, S, D], k / v [B, N2, T, D], N2 dividing N1
    (query head h reads key head h // (N1 / N2)); bias (-inf where masked) broadcasts to [B, N1, S, T]."""
    b, n1, s, d = q.shape
    n2 = k.shape[1]
    if n1 % n2:
        raise ValueError(f"key heads {n2} must divide query heads {n1}")
    qg = q.float().reshape(b, n2, n1 // n2, s, d)
    scores = torch.einsum("bgqsd,bgtd->bgqst", qg, k.float()).reshape(b, n1, s, -1) * scale + bias
    probs = scores.softmax(-1).reshape(b, n2, n1 // n2, s, -1)
    return torch.einsum("bgqst,bgtd->bgqsd", probs, v.float()).reshape(b, n1, s, -1)


# ---------------------------------------------------------------------------------------------- Intel Gaudi


class FusedSDPA:
    """SIMULATION of habana_frameworks.torch.hpex.kernels.FusedSDPA (HabanaAI/gaudi-pytorch-bridge
    hpex/kernels/FusedSDPA.py; docs.habana.ai Python_Packages.html#hpex-kernels-fusedsdpa).

    A drop-in for torch SDPA: q [B, Hq, Nt, D], k / v [B, Hkv, Ns, D] (GQA when Hkv divides Hq); a bool
    attn_mask is True where a query MAY attend, a float one is added; 2-D masks must be (Nt, Ns), others 4-D
    with 1 or Hq heads; is_causal is top-left aligned; scale defaults to 1/sqrt(D); softmax_mode is "None",
    "fast" or "fp32" (bf16 inputs only). recompute_mode only changes memory use, not values.
    """

    @staticmethod
    def apply(
        q,
        k,
        v,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        softmax_mode="None",
        recompute_mode=None,
        valid_seq_len=None,
        seq_padding_type="left",
    ):
        if dropout_p != 0.0:
            raise NotImplementedError("simulation: dropout is not simulated")
        if softmax_mode.lower() not in ("none", "fast", "fp32"):
            raise ValueError(f"unknown softmax_mode {softmax_mode!r}")
        if softmax_mode.lower() == "fp32" and q.dtype != torch.bfloat16:
            raise AssertionError("softmax_mode = fp32 is supported only when q/k/v inputs are BF16")
        if recompute_mode not in (None, True, False):
            raise TypeError("recompute_mode is a bool or None")
        if q.dim() != 4 or k.dim() != 4 or not (q.dtype == k.dtype == v.dtype):
            raise ValueError("q, k, v must be 4-D [B, H, N, D] of one dtype")
        nt, ns = q.shape[-2], k.shape[-2]
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        bias = torch.zeros(nt, ns, device=q.device)
        if is_causal:  # the wrapper applies is_causal and an attn_mask together
            bias = bias.masked_fill(~torch.ones(nt, ns, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (nt, ns):
                raise AssertionError("unsupported 2D attention mask, the shape is not (Nt, Ns)")
            if attn_mask.dim() == 2 and k.shape[1] != q.shape[1]:  # the wrapper unpacks a 4-D mask under GQA
                raise AssertionError("a 2D attention mask is not supported with grouped-query attention")
            if (
                attn_mask.dim() not in (2, 4)
                or tuple(attn_mask.shape[-2:]) != (nt, ns)
                or (attn_mask.dim() == 4 and attn_mask.shape[1] not in (1, q.shape[1]))
            ):
                raise ValueError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} is neither (Nt, Ns) nor [B, 1 or Hq, Nt, Ns]"
                )
            if attn_mask.dtype == torch.bool:
                bias = torch.where(attn_mask, bias, float("-inf"))
            else:
                bias = bias + attn_mask.float()
        return _softmax_attention(q, k, v, bias, scale).to(q.dtype)


class FusedRMSNorm:
    """SIMULATION of habana_frameworks.torch.hpex.normalization.FusedRMSNorm (gaudi-pytorch-bridge
    hpex/normalization/FusedRMSNorm.py): apply(data_in, gamma, eps) = data_in * rsqrt(mean(x^2) + eps) * gamma
    over the last dim, computed in fp32 and rounded once to data_in's dtype."""

    @staticmethod
    def apply(data_in, gamma, eps, use_stages=True, bwd_mode=0):
        if gamma.shape != data_in.shape[-1:]:
            raise ValueError(f"gamma {tuple(gamma.shape)} must be [{data_in.shape[-1]}]")
        x = data_in.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()).to(data_in.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class RotaryPosEmbeddingHelperV1:
    """SIMULATION of hpex.kernels.RotaryPosEmbeddingHelperV1 (gaudi-pytorch-bridge
    hpex/kernels/RotaryPosEmbeddingHelper.py): apply(p, cos, sin, offset), BLOCKWISE mode
    p * cos + rotate_half(p) * sin, cos / sin of p's rank broadcasting against it. Dtypes follow
    match_data_types: if any input is fp32 all become fp32 (so the output is fp32), else cos / sin take p's dtype.
    The documented offset slicing is ambiguous about its axis; only offset 0 is simulated."""

    @staticmethod
    def apply(p, cos, sin, offset):
        if offset != 0:
            raise NotImplementedError("simulation: offset > 0 is not simulated")
        if cos.dim() != p.dim() or sin.shape != cos.shape:
            raise ValueError(f"cos / sin {tuple(cos.shape)} must have the rank of p {tuple(p.shape)}")
        torch.broadcast_shapes(p.shape, cos.shape)
        dtype = torch.float32 if torch.float32 in (p.dtype, cos.dtype, sin.dtype) else p.dtype
        p, cos, sin = p.to(dtype), cos.to(dtype), sin.to(dtype)
        return (p.float() * cos.float() + _rotate_half(p.float()) * sin.float()).to(dtype)


# ---------------------------------------------------------------------------------------------- Huawei Ascend


class torch_npu:
    """SIMULATION of the torch_npu functions the NPU backend uses (hiascend.com torch_npu API reference)."""

    @staticmethod
    def npu_fusion_attention(
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=NO_BAND,
        next_tockens=NO_BAND,
        inner_precise=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
    ):
        """torch_npu.npu_fusion_attention (Pytorch 7.0.0 apilist; sparse_mode_introduction.md of ops-transformer).

        input_layout BNSD [B, N, S, D], BSND [B, S, N, D], BSH or SBH (H = N * D); head_num is the query's N;
        key heads must divide it. scale defaults to 1.0. atten_mask is bool, True = the score is MASKED OUT,
        shaped BNSS, B1SS, 11SS or SS. sparse_mode 0: atten_mask (if any) plus the band
        i - pre_tockens <= j <= i + next_tockens; 1: atten_mask only; 2 leftUpCausal / 3 rightDownCausal:
        atten_mask must be the compressed 2048 x 2048 upper triangle. Returns (attention_out in the input
        layout, softmax_max, softmax_sum, softmax_out, seed, offset, numel).
        """
        if pse is not None or padding_mask is not None or prefix is not None or actual_seq_qlen is not None:
            raise NotImplementedError("simulation: pse, padding_mask, prefix and varlen are not simulated")
        if keep_prob != 1.0:
            raise NotImplementedError("simulation: dropout is not simulated")
        if not (query.dtype == key.dtype == value.dtype):
            raise TypeError("query, key and value must share a dtype")
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"query, key and value must be float16 or bfloat16, not {query.dtype}")
        q, k, v = (_to_bnsd(x, input_layout, query.shape[-1] // head_num) for x in (query, key, value))
        if q.shape[1] != head_num:
            raise ValueError(
                f"head_num {head_num} does not match the query's {q.shape[1]} heads in layout {input_layout}"
            )
        b, n1, sq, _ = q.shape
        skv = k.shape[2]
        masked = _fusion_attention_mask(atten_mask, sparse_mode, pre_tockens, next_tockens, b, n1, sq, skv, q.device)
        bias = (
            torch.zeros((), device=q.device)
            if masked is None
            else torch.zeros(masked.shape, device=q.device).masked_fill(masked, float("-inf"))
        )
        out = _softmax_attention(q, k, v, bias, scale)
        stats = torch.zeros(b, n1, sq, 8, dtype=torch.float32, device=q.device)
        return (_from_bnsd(out.to(query.dtype), input_layout), stats, stats, query.new_empty(0), 0, 0, 0)

    @staticmethod
    def npu_grouped_matmul(
        x,
        weight,
        *,
        bias=None,
        scale=None,
        offset=None,
        antiquant_scale=None,
        antiquant_offset=None,
        per_token_scale=None,
        group_list=None,
        activation_input=None,
        activation_quant_scale=None,
        activation_quant_offset=None,
        split_item=0,
        group_type=-1,
        group_list_type=0,
        act_type=0,
        output_dtype=None,
    ):
        """torch_npu.npu_grouped_matmul (Pytorch 7.0.0 apilist), non-quantised path.

        x, weight: lists; weight holds G 2-D [K, N] tensors or one 3-D [G, K, N]. split_item 0/1: one output
        per group, 2/3: one output tensor; 1/3 take one x split on M (group_type 0) by group_list, an int64
        tensor or int list: cumulative ends (group_list_type 0, non-decreasing) or per-group counts (1).
        x and weight share a dtype (fp16, bf16, fp32; fp32 only when x, weight and y are single tensors).
        """
        if any(a is not None for a in (bias, scale, offset, antiquant_scale, per_token_scale, activation_input)):
            raise NotImplementedError("simulation: bias and quantisation are not simulated")
        weights = list(weight[0].unbind(0)) if len(weight) == 1 and weight[0].dim() == 3 else list(weight)
        if any(w.dim() != 2 for w in weights):
            raise ValueError("weight tensors must be 2-D [K, N], or one 3-D [G, K, N]")
        dtype = x[0].dtype
        if any(t.dtype != dtype for t in [*x, *weights]):
            raise TypeError("x and weight must share a dtype")
        single = len(x) == 1 and len(weight) == 1 and split_item in (2, 3)
        if dtype == torch.float32 and not single:
            raise TypeError("float32 needs x, weight and y as single tensors")
        if split_item in (0, 2):
            xs = list(x)
        elif split_item in (1, 3):
            if len(x) != 1 or group_type != 0 or group_list is None:
                raise ValueError("split_item 1/3 takes one x, group_type 0 and a group_list")
            xs = _split_rows(x[0], group_list, group_list_type, len(weights))
        else:
            raise ValueError(f"split_item must be 0..3, not {split_item}")
        if len(xs) != len(weights):
            raise ValueError(f"{len(xs)} groups of x for {len(weights)} weights")
        ys = [(xi.float() @ wi.float()).to(dtype) for xi, wi in zip(xs, weights)]
        if split_item in (0, 1):
            return ys
        return [torch.cat(ys)]

    @staticmethod
    def npu_rms_norm(x, gamma, epsilon=1e-06):
        """torch_npu.npu_rms_norm (Pytorch 7.0.0 apilist): (y, rstd); gamma has x's dtype and trailing shape,
        y = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps) in fp32."""
        if gamma.dtype != x.dtype:
            raise TypeError(f"gamma dtype {gamma.dtype} must equal self dtype {x.dtype}")
        if gamma.shape != x.shape[x.dim() - gamma.dim() :]:
            raise ValueError("gamma must match x's trailing dimensions")
        dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    @staticmethod
    def npu_rotary_position_embedding(x, cos, sin, mode=0):
        """torch_npu.npu_rotary_position_embedding (MindSpeed docs/ops/npu_rotary_position_embedding.md):
        x, cos, sin 4-D of one dtype, cos / sin broadcasting (e.g. 11SD, B1SD, BNSD for a BNSD x), D even
        and < 896; mode 0 rotate_half (GPT-NeoX), 1 rotate_interleaved (GPT-J)."""
        if not (x.dim() == cos.dim() == sin.dim() == 4) or cos.shape != sin.shape:
            raise ValueError("x, cos and sin must be 4-D, cos and sin of one shape")
        if not (x.dtype == cos.dtype == sin.dtype):
            raise TypeError("x, cos and sin must share a dtype")
        if x.shape[-1] % 2 or x.shape[-1] >= 896 or cos.shape[-1] != x.shape[-1]:
            raise ValueError("D must be even, below 896, and equal in x and cos")
        torch.broadcast_shapes(x.shape, cos.shape)
        rotate = {0: _rotate_half, 1: _rotate_interleaved}[mode]
        xf = x.float()
        return (xf * cos.float() + rotate(xf) * sin.float()).to(x.dtype)

    @staticmethod
    def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
        """torch_npu.npu_moe_token_permute (aclnnMoeTokenPermute): sortedIndicesFirst = argsort(flatten(indices)),
        sorted_indices = argsort(sortedIndicesFirst) (int32: the output row of each flattened pair),
        permuted[sorted_indices[i]] = tokens[i // topK]. indices int32 / int64, [tokens] or [tokens, topK <= 512]."""
        if padded_mode:
            raise ValueError("padded_mode=True is not supported")
        if tokens.dim() != 2 or indices.dim() not in (1, 2) or indices.shape[0] != tokens.shape[0]:
            raise ValueError("tokens [T, H] and indices [T] or [T, topK]")
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError("indices must be int32 or int64")
        topk = 1 if indices.dim() == 1 else indices.shape[1]
        if topk > 512:
            raise ValueError("topK must be <= 512")
        first = torch.argsort(indices.reshape(-1), stable=True)
        sorted_indices = torch.argsort(first, stable=True).to(torch.int32)
        permuted = tokens.new_empty(indices.numel(), tokens.shape[1])
        permuted[sorted_indices.long()] = tokens.repeat_interleave(topk, dim=0)
        if num_out_tokens:
            permuted = permuted[:num_out_tokens]
        return permuted, sorted_indices

    @staticmethod
    def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        """torch_npu.npu_moe_token_unpermute (aclnnMoeTokenUnpermute): T[k] = permuted[S[k]], times probs[i][j],
        summed over each token's topK consecutive k. sorted_indices int32; probs [tokens, topK] in the tokens'
        dtype (MindSpeed casts the tokens to the probs' dtype first); topK = 1 without probs."""
        if padded_mode:
            raise ValueError("padded_mode=True is not supported")
        if sorted_indices.dtype != torch.int32:
            raise TypeError("sorted_indices must be int32")
        if probs is not None and probs.dtype != permuted_tokens.dtype:
            raise TypeError(f"probs dtype {probs.dtype} must equal permuted_tokens dtype {permuted_tokens.dtype}")
        topk = 1 if probs is None else probs.shape[1]
        gathered = permuted_tokens[sorted_indices.long()].float().view(-1, topk, permuted_tokens.shape[-1])
        if probs is not None:
            gathered = gathered * probs.float().unsqueeze(-1)
        return gathered.sum(1).to(permuted_tokens.dtype)

    @staticmethod
    def npu_swiglu(input, dim=-1):
        """torch_npu.npu_swiglu (Pytorch 7.2.0 apilist): swish(A) * B with A the first, B the second half along
        dim; contiguous input only; output in the input's dtype."""
        if not input.is_contiguous():
            raise ValueError("npu_swiglu does not take non-contiguous tensors")
        if input.shape[dim] % 2:
            raise ValueError("the split dimension must be even")
        a, b = input.float().chunk(2, dim=dim)
        return (a * torch.sigmoid(a) * b).to(input.dtype)


def _split_rows(x: torch.Tensor, group_list, group_list_type: int, groups: int) -> list[torch.Tensor]:
    """x's rows split by npu_grouped_matmul's group_list: cumulative ends (type 0) or counts (type 1)."""
    if isinstance(group_list, torch.Tensor) and group_list.dtype != torch.int64:
        raise TypeError(f"group_list must be int64, not {group_list.dtype}")
    values = torch.as_tensor(group_list).tolist()
    if len(values) != groups:
        raise ValueError(f"group_list has {len(values)} entries for {groups} weights")
    if group_list_type == 0:
        if any(b < a for a, b in zip([0, *values], values)) or values[-1] != x.shape[0]:
            raise ValueError("group_list_type 0 wants non-decreasing cumulative row ends, the last equal to x's rows")
        counts = [b - a for a, b in zip([0, *values], values)]
    elif group_list_type == 1:
        if len(values) < 2:
            raise ValueError("group_list_type 1 (counts) needs at least 2 groups")
        if min(values) < 0 or sum(values) != x.shape[0]:
            raise ValueError("group_list_type 1 wants non-negative counts summing to x's rows")
        counts = values
    else:
        raise ValueError(f"group_list_type must be 0 or 1, not {group_list_type}")
    return list(x.split(counts))


def _to_bnsd(x: torch.Tensor, layout: str, bsh_head_dim: int) -> torch.Tensor:
    """One attention input as [B, N, S, D]; BSH / SBH split H into heads of bsh_head_dim."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    d = bsh_head_dim
    if layout == "BSH":
        return x.unflatten(-1, (-1, d)).transpose(1, 2)
    if layout == "SBH":
        return x.unflatten(-1, (-1, d)).permute(1, 2, 0, 3)
    raise ValueError(f"input_layout {layout!r} is not one of BSH, SBH, BSND, BNSD")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.transpose(1, 2).flatten(-2)
    return x.permute(2, 0, 1, 3).flatten(-2)  # SBH


def _fusion_attention_mask(atten_mask, sparse_mode, pre, nxt, b, n, sq, skv, device) -> torch.Tensor | None:
    """npu_fusion_attention's masked-out positions [B or 1, N or 1, Sq, Skv] for sparse_mode 0..3."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(skv, device=device).unsqueeze(0)
    if sparse_mode in (2, 3):
        if (
            atten_mask is None
            or tuple(atten_mask.shape) != (2048, 2048)
            or not torch.equal(atten_mask.bool(), torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1))
        ):
            raise ValueError(f"sparse_mode {sparse_mode} needs the compressed 2048 x 2048 upper-triangular atten_mask")
        return j > i if sparse_mode == 2 else j > i + (skv - sq)
    if sparse_mode not in (0, 1):
        raise NotImplementedError(f"simulation: sparse_mode {sparse_mode} is not simulated")
    if atten_mask is None:
        return None  # no mask: pre_tockens / next_tockens are ignored
    if atten_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError("atten_mask must be bool (or uint8)")
    allowed = [(b, n, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv)]
    if tuple(atten_mask.shape) not in allowed:
        raise ValueError(f"atten_mask shape {tuple(atten_mask.shape)} is not BNSS, B1SS, 11SS or SS")
    masked = atten_mask.bool()
    if sparse_mode == 0:
        masked = masked | (j > i + nxt) | (j < i - pre)
    return masked


# ---------------------------------------------------------------------------------------------- shared test inputs

FP32 = {"rtol": 1e-5, "atol": 1e-5}  # the adapter tests' fp32 tolerance, relative and absolute
# half precision: the kernel's output rounded once from an fp32 computation on the same rounded inputs
HALF = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}


def qkv(
    s: int, t: int, heads: int = 6, kv_heads: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [2, heads, s, 16] and k, v [2, kv_heads, t, 16] in dtype."""
    return tuple(
        x.to(dtype)
        for x in (torch.randn(2, heads, s, 16), torch.randn(2, kv_heads, t, 16), torch.randn(2, kv_heads, t, 16))
    )


def random_mask(*shape: int) -> torch.Tensor:
    """A fixed random bool mask (True = attend) in which every query sees key 0."""
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.6
    mask[..., 0] = True
    return mask


ATTENTION_CASES = {  # name: (S, T, kv heads, causal, mask) in our contract: GQA, bool mask True = attend
    "causal_gqa": (11, 11, 2, True, None),
    "batch_mask_gqa": (5, 13, 2, False, random_mask(2, 1, 5, 13)),
    "per_head_mask": (5, 13, 2, False, random_mask(2, 6, 5, 13)),
    "per_head_mask_one_batch": (5, 13, 2, False, random_mask(1, 6, 5, 13)),
    "cache_prefill_2d_mask": (4, 10, 2, False, torch.arange(10)[None] <= torch.arange(6, 10)[:, None]),
    "decode": (1, 9, 2, False, None),
    "causal_and_mask": (7, 7, 2, True, random_mask(7, 7)),
    "broadcast_key_mask": (5, 8, 2, False, random_mask(2, 1, 1, 8)),
    "mha": (6, 6, 6, True, None),
    "mqa": (6, 9, 1, False, random_mask(6, 9)),
}


def assert_mixtral_matches_reference(ops) -> None:
    """A tiny Mixtral built on `ops` gives the reference ops' logits (fp32, 1e-5): a full forward, then the KV-cache
    path (causal prefill, a 3-token chunk with an explicit mask, one-token decode)."""
    from mixtral.backend import Ops
    from mixtral.model import Mixtral
    from tests.conftest import small_config

    config = small_config()
    want, got = Mixtral(config, Ops.reference()), Mixtral(config, ops)
    want.init_weights(std=0.1)
    got.load_state_dict(want.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(got(tokens).logits, want(tokens).logits, **FP32)
        for model in (want, got):
            model.setup_caches(2, 16)
        for start, end in ((0, 5), (5, 8), (8, 9)):
            chunk = tokens[:, start:end]
            torch.testing.assert_close(got(chunk, start=start).logits, want(chunk, start=start).logits, **FP32)
