"""HART's scalable-resolution autoregressive transformer (Llama blocks, 1D/2D RoPE, scale embedding).

The transformer predicts the discrete tokens of every scale of the hybrid tokenizer, coarse to fine,
conditioned on text hidden states. Two forward paths give the same logits:

* :meth:`HARTTransformer.forward`: teacher forcing, all scales in one block-causal pass (training);
* :meth:`HARTTransformer.forward_scale`: one scale at a time against a :class:`KVCache` (sampling).

State-dict keys follow the official ``llm/`` checkpoint (minus the derived buffers and the residual
diffusion head, which is :class:`~hart_pipeline.models.residual_head.HARTResidualHead`).
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .. import kernels
from ..loading import StrictLoadingMixin
from ..schedules import PATCH_NUMS
from ..validation import boolean, check_config, int_list, positive_int, positive_real
from .layers import RMSNorm, TimestepEmbedding, apply_rope, image_positions, image_rope, text_rope


class LayerKV:
    """One block's part of a :class:`KVCache`: its keys and values (B, H, max_length, hd), views of the cache's
    storage. A block gets this object, not a layer index, so a compiled block (``compile_repeated_blocks``) sees
    the same kind of input in every layer and compiles once per scale shape instead of once per layer."""

    def __init__(self, cache: "KVCache", keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.keys, self.values = cache, keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, l, hd) at the cache's write position and return all keys/values so far."""
        start = self.cache.length
        end = start + k.shape[2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.keys.shape[2]}.")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The state of one generation: preallocated keys and values of every block (no ``torch.cat``
    growth), and what scale 0 computes once for all scales.

    Blocks write the keys of the current call at ``[length, length + l)`` through their :attr:`layers` entry;
    :meth:`advance` moves the write position once all blocks have run. One cache per generation: concurrent
    generations never share state.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the head's AdaLN of the condition
        self.level_embeddings: Optional[torch.Tensor] = None  # (num_scales, C)
        self.hidden_states: Optional[torch.Tensor] = None  # last-block output of the latest scale
        # (input, output) of the latest whole scale's blocks: FastVAR's cache for pruned tokens
        self.previous: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._split_layers()

    def _split_layers(self) -> None:
        self.layers = [LayerKV(self, k, v) for k, v in zip(self.keys.unbind(0), self.values.unbind(0))]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def select_rows(self, num_rows: int) -> None:
        """Keep only the first ``num_rows`` batch rows (e.g. drop the CFG unconditional half)."""
        self.keys, self.values = self.keys[:, :num_rows], self.values[:, :num_rows]
        self._split_layers()
        if self.modulation is not None:
            self.modulation = tuple(m[:num_rows] for m in self.modulation)


class HARTAttnProcessor:
    """HART's attention: fused qkv projection with q/v biases, RoPE, the KV cache, then diffusers'
    ``dispatch_attention_fn`` (so diffusers' backends apply) with the block-causal pattern by scale.

    ``attention_dtype``: the softmax attention (and the KV cache, which ``new_kv_cache`` allocates in it) in this
    dtype, e.g. bfloat16 on a CPU with bf16 units (AMX), where it runs ~2.5x faster than in float32; the
    projections stay in the activations' dtype. Not exact; set it with ``transformer.set_attn_processor(...)``.
    None (the default, exact): the activations' dtype.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, attention_dtype: Optional[torch.dtype] = None):
        self.attention_dtype = attention_dtype

    def __call__(self, attn: "HARTAttention", hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv: Optional[LayerKV] = None, block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        B, L, C = hidden_states.shape
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        # the projection runs as a module call (offload hooks, quantized layers see it), its bias added after
        qkv = (attn.qkv_proj(hidden_states) + bias).view(B, L, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if attn.l2_norm:  # cosine attention with a learned temperature per head (before RoPE, as the official code)
            q = F.normalize(q, dim=-1) * attn.scale_mul_1H11.clamp_max(attn.MAX_SCALE_MUL).exp()
            k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.attention_dtype is not None:
            q, k, v = q.to(self.attention_dtype), k.to(self.attention_dtype), v.to(self.attention_dtype)
        if kv is not None:
            k, v = kv.update(k, v)
        out = kernels.attention(q, k, v, attn.scale, self._attention_backend, block_ends)
        return attn.proj(out.transpose(1, 2).reshape(B, L, C).to(hidden_states.dtype))


class HARTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with a fused qkv projection, q/v biases (no k bias) and RoPE.

    The softmax scale is ``0.25 / sqrt(head_dim)`` (VAR's scale without l2-normalised q/k; the released model).
    With ``l2_norm`` (the official ``attn_l2_norm``, VAR's default): q and k are L2-normalised per head and q is
    multiplied by a learned per-head temperature ``exp(scale_mul_1H11)`` (initialised to 4, capped at 100), softmax
    scale 1, so a head can sharpen its attention without growing its q/k weights.
    """

    _default_processor_cls = HARTAttnProcessor
    _available_processors = [HARTAttnProcessor]
    _supports_qkv_fusion = False  # already fused
    MAX_SCALE_MUL = math.log(100.0)  # the l2_norm temperature's cap

    def __init__(self, dim: int, num_heads: int, l2_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())  # the official name
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.set_processor(self._default_processor_cls())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: Optional[LayerKV] = None,
                block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        return self.processor(self, x, cos, sin, kv, block_ends)


class HARTFeedForward(nn.Module):
    """Llama SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # inference: in place (bit-identical); at 512px the last scale's (2B, L, hidden) fp32 tensors are above
        # glibc's mmap threshold, so each fresh one costs its pages' faults
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


class HARTBlock(nn.Module):
    """Pre-norm Llama block; one RMSNorm (``ln_wo_grad``) serves both sub-layers, no AdaLN."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, eps: float, attn_l2_norm: bool = False):
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.attn = HARTAttention(dim, num_heads, attn_l2_norm)
        self.ffn = HARTFeedForward(dim, hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: Optional[LayerKV] = None,
                block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        h, x = self.ln_wo_grad(self.attn(self.ln_wo_grad(x), cos, sin, kv, block_ends), residual=x)
        return x + self.ffn(h)


class AdaLNBeforeHead(nn.Module):
    """RMSNorm modulated by the text condition (max-pooled over all text positions) before the head."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, condition: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """condition (N, T, C) -> scale, shift (N, 1, C). Padded text positions are pooled too."""
        scale, shift = self.ada_lin(condition.max(dim=1).values).unflatten(-1, (2, -1)).unbind(-2)
        return scale[:, None], shift[:, None]

    def forward(self, h: torch.Tensor, modulation: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = modulation
        return self.ln_wo_grad(h) * (1 + scale) + shift


@dataclass
class HARTTransformerOutput(BaseOutput):
    """
    Args:
        logits: (B, sum(pn^2), V) fp32; entry j predicts image token j (0 is the 1x1 scale). With a
            KV cache: the logits (N, pn^2, V) of the scale that was run.
        hidden_states: (B, sum(pn^2), C) last-block outputs at the same positions (the residual
            diffusion head is conditioned on those of the final scale).
        residual_condition: (N, pn^2, C) the residual head's condition (with ``residual_tokens``).
    """

    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    residual_condition: Optional[torch.Tensor] = None


# Types and ranges of the config fields (upper bounds catch typos that would exhaust memory).
CONFIG_RULES = {
    "latent_channels": positive_int(4096), "vocab_size": positive_int(1 << 20), "embed_dim": positive_int(1 << 16),
    "num_layers": positive_int(1024), "num_heads": positive_int(1024), "mlp_ratio": positive_real(64.0),
    "norm_eps": positive_real(1.0), "context_tokens": positive_int(1 << 16), "context_dim": positive_int(1 << 16),
    "patch_nums": int_list(1, 1024, increasing=True), "rope_theta": positive_real(),
}


class HARTTransformer(StrictLoadingMixin, ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""The HART autoregressive transformer.

    Text hidden states (B, T, ``context_dim``) enter as T prefix tokens (1D RoPE on their position
    ids); each scale ``si >= 1`` enters as ``word_embed`` of the upsampled-then-downsampled running
    latent (2D RoPE on the final-scale frame); a sinusoidal embedding of the scale index is added to
    every token. Token j of scale ``si`` attends to every token of scales ``<= si``.

    Args:
        latent_channels: channels of the tokenizer latent (``Cvae``).
        vocab_size: tokenizer codebook size.
        embed_dim, num_layers, num_heads, mlp_ratio, norm_eps: the Llama trunk.
        context_tokens: text length the model was trained with (the official model pads to 300).
        context_dim: hidden size of the text encoder.
        patch_nums: default patch schedule (the released model: 1024px, 14 scales).
        rope_theta: RoPE base.
        attn_l2_norm: cosine attention with a learned per-head temperature (see :class:`HARTAttention`); the
            official option, off in the released model (False also for configs that do not state it).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["HARTBlock"]
    _repeated_blocks = ["HARTBlock"]  # transformer.compile_repeated_blocks(dynamic=True): regional torch.compile
    _config_rules = CONFIG_RULES  # fields config.json must state (StrictLoadingMixin)
    # layerwise casting stores the trunk's Linear weights in a low dtype; the input embeddings and the
    # logits head keep the compute dtype (token choices follow the logits)
    _skip_layerwise_casting_patterns = ["word_embed", "context_embed", "lvl_embed", "head", "norm"]
    _skip_keys = ["kv_cache"]  # accelerate hooks leave the generation state where it is

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 32,
        vocab_size: int = 4096,
        embed_dim: int = 1536,
        num_layers: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        context_tokens: int = 300,
        context_dim: int = 1536,
        patch_nums: Tuple[int, ...] = PATCH_NUMS[1024],
        rope_theta: float = 10000.0,
        attn_l2_norm: bool = False,
    ):
        super().__init__()
        # attn_l2_norm is validated but not required in config.json (folders without it: off, as released)
        check_config("HARTTransformer", locals(), {**CONFIG_RULES, "attn_l2_norm": boolean})
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"HARTTransformer config: `embed_dim` ({embed_dim}) / `num_heads` ({num_heads}) must be an "
                             "integer head size divisible by 4 (HART's 2D RoPE); fix them in the config.json.")
        hidden_dim = int(embed_dim * mlp_ratio * 2 / 3 + 255) // 256 * 256
        self.word_embed = nn.Linear(latent_channels, embed_dim)
        self.context_embed = nn.Linear(context_dim, embed_dim)
        self.context_norm = RMSNorm(context_dim, norm_eps)
        self.lvl_embed = TimestepEmbedding(embed_dim)
        self.blocks = nn.ModuleList(HARTBlock(embed_dim, num_heads, hidden_dim, norm_eps, attn_l2_norm)
                                    for _ in range(num_layers))
        self.head_nm = AdaLNBeforeHead(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)
        self.decoder_norm = RMSNorm(embed_dim, norm_eps)
        self.gradient_checkpointing = False

    @property
    def head_dim(self) -> int:
        return self.config.embed_dim // self.config.num_heads

    # ----------------------------------------------------------------------------- embeddings
    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text hidden states (N, T, Ct) -> condition tokens (N, T, C). An all-zero row is the CFG null."""
        if context.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"Text hidden states have width {context.shape[-1]} but this transformer expects "
                f"context_dim={self.config.context_dim}; use the text encoder the model was trained with."
            )
        return self.context_embed(self.context_norm(context.to(self.dtype)))

    def scale_embeddings(self, num_scales: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Sinusoidal level embedding of every scale index: (num_scales, C); level 0 is the text."""
        return self.lvl_embed(torch.arange(num_scales, device=device))

    def embed_scale(self, scale_input: torch.Tensor, level_embedding: torch.Tensor) -> torch.Tensor:
        """Latent tokens of one scale (N, l, Cv) + that scale's level embedding (C,) -> (N, l, C)."""
        return self.word_embed(scale_input.to(self.dtype)) + level_embedding

    def image_rope(self, patch_nums: Sequence[int], scale_indices: Sequence[int],
                   context_position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE tables of the given scales, concatenated: (N, sum l, hd)."""
        device = context_position_ids.device
        positions = torch.cat([image_positions(patch_nums[si], patch_nums[-1], device) for si in scale_indices])
        return image_rope(positions, context_position_ids[:, -1], self.head_dim, self.config.rope_theta, self.dtype)

    def text_rope(self, context_position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return text_rope(context_position_ids, self.head_dim, self.config.rope_theta, self.dtype)

    # ----------------------------------------------------------------------------- trunk and head
    def head_modulation(self, condition: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (scale, shift) of the head's AdaLN for condition tokens (N, T, C); compute once per generation."""
        return self.head_nm.modulation(condition)

    def logits(self, hidden_states: torch.Tensor, modulation: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Last-block hidden states (N, l, C) -> fp32 logits (N, l, V)."""
        return self.head(self.head_nm(hidden_states, modulation)).float()

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Optional[KVCache] = None,
                   block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            kv = None if kv_cache is None else kv_cache.layers[layer]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, cos, sin, kv, block_ends)
            else:
                x = block(x, cos, sin, kv, block_ends)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return x

    def new_kv_cache(self, batch_size: int, patch_nums: Sequence[int], num_context_tokens: int,
                     device: Optional[torch.device] = None) -> KVCache:
        """An empty cache sized for one generation: T text tokens + every image token but the 1x1.

        ``device``: where the generation runs (the pipeline's execution device; default the model's).
        """
        max_length = num_context_tokens + sum(pn * pn for pn in patch_nums) - 1
        # in the attention's dtype where the processor sets one (HARTAttnProcessor(attention_dtype=...))
        dtype = getattr(self.blocks[0].attn.processor, "attention_dtype", None) or self.dtype
        return KVCache(len(self.blocks), batch_size, self.config.num_heads, max_length, self.head_dim, dtype,
                       device or self.device)

    def forward_scale(self, x: torch.Tensor, scale_index: int, patch_nums: Sequence[int],
                      context_position_ids: torch.Tensor, kv_cache: KVCache,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Incremental forward of one scale against the KV cache.

        Args:
            x: (N, l, C) embedded tokens: the condition tokens (+ level 0) for ``scale_index == 0``,
                else :meth:`embed_scale` of that scale's input.
            context_position_ids: (N, T) text position ids (zeros for the CFG null rows).
            positions: (N, l) row-major indices of the given tokens within the scale when x holds only
                part of it (the MaskGIT final stage); None = the whole scale in order.
        Returns:
            (N, l, C) last-block hidden states.
        """
        if scale_index == 0:
            cos, sin = self.text_rope(context_position_ids)
        else:
            cos, sin = self.image_rope(patch_nums, [scale_index], context_position_ids)
            if positions is not None:
                index = positions.to(self.device)[..., None].expand(-1, -1, cos.shape[-1])
                cos, sin = cos.gather(1, index), sin.gather(1, index)
        return self.run_blocks(x, cos, sin, kv_cache)

    def forward(
        self,
        context: Optional[torch.Tensor],
        context_position_ids: torch.Tensor,
        scale_inputs: Optional[torch.Tensor] = None,
        patch_nums: Optional[Sequence[int]] = None,
        kept_positions: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        kv_cache: Optional[KVCache] = None,
        scale_index: int = 0,
        residual_tokens: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        token_pruning: float = 0.0,
    ):
        """Teacher-forced forward over all scales at once, or (with ``kv_cache``) one step of sampling.

        Every computation of a generation goes through here, so offload hooks (model, sequential, group)
        see each one.

        Args:
            context: (B, T, Ct) text hidden states (zero rows for dropped conditions). With a KV cache:
                the (N, T, Ct) rows of every CFG half, read at ``scale_index`` 0 only.
            context_position_ids: (B, T) int64 text position ids.
            scale_inputs: (B, sum(pn^2) - 1, Cv) inputs of scales 1.. (the tokenizer's
                ``teacher_forcing_input`` of the ground-truth indices). With a KV cache: the (N / k,
                pn^2, Cv) input of ``scale_index`` (None at 0), shared by the k CFG halves of the cache.
            patch_nums: the patch schedule; defaults to ``config.patch_nums``.
            kept_positions: (B, k) int64, ascending row-major positions of the final-scale tokens that
                stay in the sequence (HART's training-time token dropping); the others are removed
                from the pass. The kept tokens keep their 2D RoPE positions and attend to every earlier
                scale and to each other. None keeps all.
            kv_cache: the generation state from :meth:`new_kv_cache`: run scale ``scale_index`` only.
            residual_tokens: with a KV cache, (N, pn^2, Cv) codebook vectors of the tokens chosen at the
                last scale run: return the residual head's condition instead of running a scale.
            positions: with a KV cache, (N / k, n) ascending row-major positions: run only these tokens of
                the scale (the MaskGIT final stage); they attend to the cache, earlier groups included.
            token_pruning: with a KV cache, the fraction of the scale's tokens that skip the blocks (opt-in
                FastVAR-style cached token pruning, Guo et al. 2025, arXiv 2503.23367): the pivotal tokens,
                those whose input is farthest from the scale's mean input, run; a pruned token gets its input
                plus what the blocks added at the previous scale, area-resized (cached token restoration), and
                adds no key to the cache. 0 (default) runs every token.
        Returns:
            :class:`HARTTransformerOutput` with logits (B, sum(pn^2), V) and hidden states (with
            ``kept_positions`` the final scale has only the k kept entries, in that order; with a KV
            cache those of the scale run; at scale 0 the last text position), or the residual condition.
        """
        if kv_cache is not None:
            if residual_tokens is not None:
                condition = self.residual_condition(kv_cache.hidden_states, residual_tokens)
                return HARTTransformerOutput(residual_condition=condition) if return_dict else (condition,)
            logits, h = self._forward_cached(context, context_position_ids, scale_inputs, patch_nums, kv_cache, scale_index,
                                             positions, token_pruning)
            return HARTTransformerOutput(logits=logits, hidden_states=h) if return_dict else (logits, h)
        patch_nums = tuple(patch_nums or self.config.patch_nums)
        num_image = sum(pn * pn for pn in patch_nums)
        if scale_inputs.shape[1] != num_image - 1:
            raise ValueError(
                f"scale_inputs has {scale_inputs.shape[1]} tokens; patch_nums {patch_nums} needs "
                f"sum(pn^2) - 1 = {num_image - 1}."
            )
        num_scales, T = len(patch_nums), context.shape[1]
        num_last = patch_nums[-1] ** 2
        levels = torch.cat([torch.zeros(T, dtype=torch.long)] +
                           [torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums) if si]).to(context.device)
        level_emb = self.scale_embeddings(num_scales, context.device)[levels]  # (L, C)
        condition = self.embed_context(context)
        x = torch.cat([condition, self.word_embed(scale_inputs.to(self.dtype))], dim=1) + level_emb
        text_cos, text_sin = self.text_rope(context_position_ids)
        img_cos, img_sin = self.image_rope(patch_nums, range(1, num_scales), context_position_ids)
        cos, sin = torch.cat([text_cos, img_cos], 1), torch.cat([text_sin, img_sin], 1)
        if kept_positions is not None:  # drop final-scale tokens: gather the kept rows of x and of the RoPE tables
            kept_positions = kept_positions.to(context.device)
            if kept_positions.ndim != 2 or kept_positions.shape[0] != x.shape[0]:
                raise ValueError(f"kept_positions must be (B, k) with B = {x.shape[0]}; got {tuple(kept_positions.shape)}.")
            prefix = x.shape[1] - num_last
            rows = torch.cat([torch.arange(prefix, device=context.device).expand(x.shape[0], -1),
                              prefix + kept_positions], dim=1)  # (B, prefix + k)
            x, cos, sin = (t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1])) for t in (x, cos, sin))
        block_ends = [T + sum(pn * pn for pn in patch_nums[1:si + 1]) for si in range(num_scales - 1)] + [x.shape[1]]
        h = self.run_blocks(x, cos, sin, block_ends=block_ends)[:, T - 1:]
        logits = self.logits(h, self.head_modulation(condition))
        if not return_dict:
            return logits, h
        return HARTTransformerOutput(logits=logits, hidden_states=h)

    def _forward_cached(self, context: Optional[torch.Tensor], context_position_ids: torch.Tensor,
                        scale_input: Optional[torch.Tensor], patch_nums: Optional[Sequence[int]], kv_cache: KVCache,
                        scale_index: int, positions: Optional[torch.Tensor] = None,
                        token_pruning: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """One scale (or the ``positions`` of one) of sampling against the KV cache: logits (N, l, V) and
        hidden states (N, l, C)."""
        patch_nums = tuple(patch_nums or self.config.patch_nums)
        if scale_index == 0:
            condition = self.embed_context(context)  # (N, T, C)
            kv_cache.modulation = self.head_modulation(condition)
            kv_cache.level_embeddings = self.scale_embeddings(len(patch_nums), condition.device)
            x = condition + kv_cache.level_embeddings[0]
        else:
            if positions is not None:  # a MaskGIT group: embed only its tokens (the embedding is per token)
                index = positions.to(scale_input.device)[..., None].expand(-1, -1, scale_input.shape[-1])
                scale_input = scale_input.gather(1, index)
            x = self.embed_scale(scale_input, kv_cache.level_embeddings[scale_index])
            x = x.repeat(kv_cache.batch_size // x.shape[0], 1, 1)
        if positions is not None:
            positions = positions.to(x.device).repeat(x.shape[0] // positions.shape[0], 1)  # (N, n)
            h = self.forward_scale(x, scale_index, patch_nums, context_position_ids, kv_cache, positions=positions)
        elif token_pruning > 0:
            h = self._forward_pruned(x, scale_index, patch_nums, context_position_ids, kv_cache, token_pruning)
        else:
            h = self.forward_scale(x, scale_index, patch_nums, context_position_ids, kv_cache)
        if positions is None:
            kv_cache.previous = (x, h)
        if scale_index == 0:
            h = h[:, -1:]  # the 1x1 token is predicted from the last text position
        kv_cache.hidden_states = h
        return self.logits(h, kv_cache.modulation), h

    def _forward_pruned(self, x: torch.Tensor, scale_index: int, patch_nums: Sequence[int],
                        context_position_ids: torch.Tensor, kv_cache: KVCache, prune_ratio: float) -> torch.Tensor:
        """FastVAR-style cached token pruning of one scale (see ``token_pruning`` in :meth:`forward`)."""
        N, L, C = x.shape
        prev_in, prev_out = (p[:N] for p in kv_cache.previous)  # (the unconditional rows may have been dropped since)
        pn, prev_pn = patch_nums[scale_index], math.isqrt(prev_in.shape[1])
        num_kept = max(1, L - int(L * prune_ratio))
        score = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(-1)  # (N, L); both CFG halves share their inputs
        kept = score.topk(num_kept, dim=1).indices.sort(dim=1).values  # (N, num_kept)
        h_kept = self.forward_scale(x.gather(1, kept[..., None].expand(-1, -1, C)), scale_index, patch_nums,
                                    context_position_ids, kv_cache, positions=kept)
        delta = (prev_out - prev_in).transpose(1, 2).reshape(N, C, prev_pn, prev_pn)
        delta = F.interpolate(delta.float(), size=(pn, pn), mode="area").to(x.dtype).flatten(2).transpose(1, 2)
        return (x + delta).scatter(1, kept[..., None].expand(-1, -1, C), h_kept)

    def residual_condition(self, hidden_states: torch.Tensor, discrete_tokens: torch.Tensor) -> torch.Tensor:
        """Condition of the residual diffusion head: ``decoder_norm(h + word_embed(codebook[idx]))``.

        hidden_states (N, l, C) of the final scale; discrete_tokens (N, l, Cv) the codebook vectors of
        the chosen (hard) indices.
        """
        return self.decoder_norm(hidden_states + self.word_embed(discrete_tokens.to(self.dtype)))


__all__ = ["HARTTransformer", "HARTTransformerOutput", "KVCache", "LayerKV"]
