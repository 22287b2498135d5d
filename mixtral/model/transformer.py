"""The Mixtral decoder: embedding, blocks of (RMSNorm, attention, RMSNorm, MoE), final norm, lm head.

Parameter names follow transformers' MixtralForCausalLM (without the `model.` prefix), so the
HF mapping is a rename. The ops come from a backend, resolved once here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mixtral.backend import Backend, Ops
from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.model.attention import Attention, attention_mask
from mixtral.model.init import init_parameters
from mixtral.model.kv_cache import KVCache
from mixtral.model.layout import ModelLayout
from mixtral.model.linear import projection
from mixtral.model.moe import MoE, MoEStats, moe_step_end
from mixtral.model.rope import rope_tables


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V], [B, 1, V] with last_only, [B * S, V] with flat
    routing: list[MoEStats]  # each block's: router logits (the losses' input), tokens per expert, drops, bin

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[layers, experts] int64: how many token-expert pairs each block routed to each expert."""
        return torch.stack([r.counts for r in self.routing])


def run_blocks(blocks, x: torch.Tensor, inputs: tuple, last_only: bool = False) -> tuple[torch.Tensor, list[MoEStats]]:
    """x through blocks (the model's, or a pipeline stage's) with Mixtral.layer_inputs' (start, cos, sin, mask,
    causal); last_only: the final block computes its last position alone."""
    start, cos, sin, mask, causal = inputs
    routing = []
    *_, final = blocks
    for block in blocks:
        x, stats = block(x, cos, sin, start, mask, causal, last_only and block is final)
        routing.append(stats)
    return x, routing


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.norm = eps, ops.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.eps)


RECOMPUTE = ("none", "selective", "moe", "full")  # activation checkpointing: Mixtral's `recompute`


class Block(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ops: Ops,
        moe: MoEConfig | None = None,
        recompute: str = "none",
        layout: ModelLayout | None = None,
    ) -> None:
        """recompute: "block" recomputes the whole block in backward, "moe" its MoE layer, "none" stores all."""
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, ops, layout)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MoE(config, ops, moe, layout)
        self.recompute = recompute

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        causal: bool,
        last_only: bool = False,
    ):
        """last_only (the final block of a prefill that keeps the last logits): the KV cache gets every
        position, attention and the MoE run for the last one, whose output is all that is read."""
        if self.recompute == "block" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, start, mask, causal, last_only, use_reentrant=False)
        return self._forward(x, cos, sin, start, mask, causal, last_only)

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        causal: bool,
        last_only: bool,
    ):
        attended = self.self_attn(
            self.input_layernorm(x), cos=cos, sin=sin, start=start, mask=mask, causal=causal, last_only=last_only
        )  # by keyword: tensor parallelism lays out x alone
        x = (x[:, -1:] if last_only else x) + attended
        if self.recompute == "moe" and torch.is_grad_enabled():
            moe_out, stats = checkpoint(self.mlp, self.post_attention_layernorm(x), use_reentrant=False)
        else:
            moe_out, stats = self.mlp(self.post_attention_layernorm(x))
        return x + moe_out, stats


class Mixtral(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: Backend | Ops | None = None,
        moe: MoEConfig | None = None,
        recompute: str = "none",
        layout: ModelLayout | None = None,
    ) -> None:
        """recompute (activation checkpointing): full recomputes every block in backward instead of storing its
        activations; selective every other block (0, 2, ...), torchtitan's layer-frequency scheme: about half the
        memory for about half the recompute; moe the MoE layer of every block (Megatron's --moe-layer-recompute),
        whose expert activations are the largest. layout: what this rank holds and how it reaches the rest under
        expert and context parallelism (mixtral.parallel.model_layout); None: everything, in one process."""
        super().__init__()
        ops = backend if isinstance(backend, Ops) else (backend.ops if backend else Ops.reference())
        self.config, self.moe = config, moe or MoEConfig()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if recompute not in RECOMPUTE:
            raise MixtralError(
                f"activation_checkpointing {recompute!r} is unknown; choose one of: {', '.join(RECOMPUTE)}"
            )
        per_block = {
            "none": lambda i: "none",
            "full": lambda i: "block",
            "moe": lambda i: "moe",
            "selective": lambda i: "block" if i % 2 == 0 else "none",
        }[recompute]
        self.layout = layout or ModelLayout()
        self.layers = nn.ModuleList(
            Block(config, ops, self.moe, per_block(i), self.layout) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else projection(config.hidden_size, config.vocab_size, ops, self.layout.int8)
        )
        self.linear = ops.linear
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Fresh training init of the whole model: normal(0, std) matrices, unit norms (transformers'
        initializer_range), the same values any layout of this seed holds (mixtral.model.init); seed None draws
        one from torch's generator."""
        seed = int(torch.randint(2**62, ())) if seed is None else seed
        init_parameters(self, {name: p.shape for name, p in self.named_parameters()}, seed, std)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str) -> None:
        """After materialising (to_empty): the rope tables computed on device in the buffers' dtype, and the
        routing state (expert bias and load, capacity bins) of every materialised block back to zero."""
        cos, sin = rope_tables(
            self.config.head_dim,
            self.config.max_position_embeddings,
            self.config.rope_theta,
            device=torch.device(device),
        )
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)
        for module in self.layers.modules():
            for buffer in module.buffers(recurse=False):
                if not buffer.is_meta:
                    buffer.zero_()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits: a module call for an untied head (tensor parallelism shards it over the vocabulary),
        the embedding's weight for a tied one."""
        return self.lm_head(x) if self.lm_head is not None else self.linear(x, self.embed_tokens.weight)

    def setup_caches(
        self,
        batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        layers: list[nn.Module] | None = None,
    ) -> None:
        """Allocate a static KV cache for generation up to max_len positions in every layer (or in `layers`)."""
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        c = self.config
        for layer in self.layers if layers is None else layers:  # local kv heads: tensor parallelism splits them
            weight = layer.self_attn.k_proj.weight
            kv_heads = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0] // c.head_dim
            layer.self_attn.kv_cache = KVCache(batch, kv_heads, max_len, c.head_dim, dtype, device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        start: int | torch.Tensor = 0,
        last_only: bool = False,
        pad: torch.Tensor | None = None,
        flat: bool = False,
    ) -> ModelOutput:
        """Logits of tokens [B, S] at positions start..start+S, and each block's routing.

        last_only computes logits for the final position only (generation prefill): the last block computes
        attention and experts for that position alone (its routing then counts that position alone), every
        block still fills the KV cache for all positions. pad [B] int64 says how many slots row b is
        left-padded by (batched prompts of different lengths): those keys are masked and row b's positions
        start pad[b] slots later. start as a 0-dim device tensor (decoding on backends that compile fixed
        shapes) keeps every step's shapes and graph the same: the whole KV cache is attended under a mask.
        flat returns the logits as [B * S, V], a tensor of its own that a loss may overwrite with its gradient.
        """
        x = self.embed_tokens(tokens)
        inputs = self.layer_inputs(tokens, start, pad, x.dtype)
        x, routing = run_blocks(self.layers, x, inputs, last_only)
        x = self.norm(x)
        return ModelOutput(self.head(x.flatten(0, 1) if flat else x), routing)

    def layer_inputs(
        self, tokens: torch.Tensor, start: int | torch.Tensor, pad: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[int | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """(start, cos, sin, mask, causal) every block takes for tokens [B, S] at positions start..start+S.

        Under context parallelism the tokens are chunk i of `chunks` equal chunks: their positions
        start i * S later and their keys (gathered by attention) are the whole sequence.
        """
        seq = tokens.shape[1]
        has_cache = self.layers[0].self_attn.kv_cache is not None
        chunk, chunks = self.layout.context
        if chunks > 1 and has_cache:
            raise ValueError(
                "context parallelism runs training forwards only; generate without a KV cache or with parallel.cp = 1"
            )
        fixed_shapes = isinstance(start, torch.Tensor)  # positions on the device: the whole cache is attended
        start = start + chunk * seq
        if fixed_shapes:
            kv_len = self.layers[0].self_attn.kv_cache.k.shape[2]
        else:
            kv_len = start + seq if has_cache else seq * chunks
            if start + seq > self.config.max_position_embeddings:
                raise ValueError(
                    f"positions up to {start + seq} exceed max_position_embeddings "
                    f"{self.config.max_position_embeddings}"
                )
        mask, causal = attention_mask(
            start if has_cache or chunks > 1 else 0, seq, kv_len, self.config.sliding_window, tokens.device, pad
        )
        if pad is None and not fixed_shapes:
            cos = self.rope_cos[start : start + seq].to(dtype)
            sin = self.rope_sin[start : start + seq].to(dtype)
        else:  # positions gathered: [S, D], or per row [B, 1, S, D]
            positions = start + torch.arange(seq, device=tokens.device)
            if pad is not None:
                positions = (positions - pad.view(-1, 1)).clamp_min(0)
            cos, sin = self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)
            if pad is not None:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return start, cos, sin, mask, causal

    def moe_step_end(self) -> bool:
        """Call after every optimizer step of one process: expert-bias updates, capacity-bin usage and re-shaping
        (the trainer sums their statistics over the data ranks: mixtral.train.trainer)."""
        return moe_step_end([layer.mlp for layer in self.layers])


def parameter_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and global shapes for this config, from a model built on the meta device."""
    with torch.device("meta"):
        model = Mixtral(config)
    return {name: param.shape for name, param in model.named_parameters()}
