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
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .. import kernels
from ..schedules import PATCH_NUMS
from .layers import RMSNorm, TimestepEmbedding, apply_rope, image_positions, image_rope, text_rope


class KVCache:
    """Preallocated keys and values of every block for one generation (no ``torch.cat`` growth).

    Blocks write the keys of the current call at ``[length, length + l)``; :meth:`advance` moves the
    write position once all blocks have run.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, l, hd) of ``layer`` and return all keys/values so far (B, H, length + l, hd)."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.keys.shape[3]}.")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def select_rows(self, num_rows: int) -> None:
        """Keep only the first ``num_rows`` batch rows (e.g. drop the CFG unconditional half)."""
        self.keys, self.values = self.keys[:, :num_rows], self.values[:, :num_rows]


class HARTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, q/v biases (no k bias) and RoPE.

    The softmax scale is ``0.25 / sqrt(head_dim)`` (VAR's scale without l2-normalised q/k).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.backend = "sdpa"
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Optional[KVCache] = None,
                layer: int = 0, block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv_proj.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        out = kernels.attention(q, k, v, self.scale, self.backend, block_ends)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class HARTFeedForward(nn.Module):
    """Llama SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HARTBlock(nn.Module):
    """Pre-norm Llama block; one RMSNorm (``ln_wo_grad``) serves both sub-layers, no AdaLN."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.attn = HARTAttention(dim, num_heads)
        self.ffn = HARTFeedForward(dim, hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Optional[KVCache] = None,
                layer: int = 0, block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        h, x = self.ln_wo_grad.add_forward(self.attn(self.ln_wo_grad(x), cos, sin, kv_cache, layer, block_ends), x)
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
        logits: (B, sum(pn^2), V) fp32; entry j predicts image token j (0 is the 1x1 scale).
        hidden_states: (B, sum(pn^2), C) last-block outputs at the same positions (the residual
            diffusion head is conditioned on those of the final scale).
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor


class HARTTransformer(ModelMixin, ConfigMixin):
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
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["HARTBlock"]
    _repeated_blocks = ["HARTBlock"]  # transformer.compile_repeated_blocks(dynamic=True): regional torch.compile

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
    ):
        super().__init__()
        hidden_dim = int(embed_dim * mlp_ratio * 2 / 3 + 255) // 256 * 256
        self.word_embed = nn.Linear(latent_channels, embed_dim)
        self.context_embed = nn.Linear(context_dim, embed_dim)
        self.context_norm = RMSNorm(context_dim, norm_eps)
        self.lvl_embed = TimestepEmbedding(embed_dim)
        self.blocks = nn.ModuleList(HARTBlock(embed_dim, num_heads, hidden_dim, norm_eps) for _ in range(num_layers))
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

    def scale_embeddings(self, num_scales: int) -> torch.Tensor:
        """Sinusoidal level embedding of every scale index: (num_scales, C); level 0 is the text."""
        levels = torch.arange(num_scales, device=self.device)
        return self.lvl_embed(levels)

    def embed_scale(self, scale_input: torch.Tensor, level_embedding: torch.Tensor) -> torch.Tensor:
        """Latent tokens of one scale (N, l, Cv) + that scale's level embedding (C,) -> (N, l, C)."""
        return self.word_embed(scale_input.to(self.dtype)) + level_embedding

    def image_rope(self, patch_nums: Sequence[int], scale_indices: Sequence[int],
                   context_position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE tables of the given scales, concatenated: (N, sum l, hd)."""
        positions = torch.cat([image_positions(patch_nums[si], patch_nums[-1], self.device) for si in scale_indices])
        offset = context_position_ids[:, -1].to(self.device)
        return image_rope(positions, offset, self.head_dim, self.config.rope_theta, self.dtype)

    def text_rope(self, context_position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return text_rope(context_position_ids.to(self.device), self.head_dim, self.config.rope_theta, self.dtype)

    # ----------------------------------------------------------------------------- trunk and head
    def head_modulation(self, condition: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (scale, shift) of the head's AdaLN for condition tokens (N, T, C); compute once per generation."""
        return self.head_nm.modulation(condition)

    def logits(self, hidden_states: torch.Tensor, modulation: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Last-block hidden states (N, l, C) -> fp32 logits (N, l, V)."""
        return self.head(self.head_nm(hidden_states, modulation)).float()

    def set_attention_backend(self, backend: str) -> None:
        """Attention implementation of every block: "sdpa" (default), "xformers" or "math" (explicit)."""
        kernels.check_backend(backend)
        for block in self.blocks:
            block.attn.backend = backend

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Optional[KVCache] = None,
                   block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, cos, sin, kv_cache, layer, block_ends)
            else:
                x = block(x, cos, sin, kv_cache, layer, block_ends)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return x

    def new_kv_cache(self, batch_size: int, patch_nums: Sequence[int], num_context_tokens: int) -> KVCache:
        """An empty cache sized for one generation: T text tokens + every image token but the 1x1."""
        max_length = num_context_tokens + sum(pn * pn for pn in patch_nums) - 1
        return KVCache(len(self.blocks), batch_size, self.config.num_heads, max_length, self.head_dim,
                       self.dtype, self.device)

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
        context: torch.Tensor,
        context_position_ids: torch.Tensor,
        scale_inputs: torch.Tensor,
        patch_nums: Optional[Sequence[int]] = None,
        return_dict: bool = True,
    ):
        """Teacher-forced forward over all scales at once.

        Args:
            context: (B, T, Ct) text hidden states (zero rows for dropped conditions).
            context_position_ids: (B, T) int64 text position ids.
            scale_inputs: (B, sum(pn^2) - 1, Cv) inputs of scales 1.. (the tokenizer's
                ``teacher_forcing_input`` of the ground-truth indices).
            patch_nums: the patch schedule; defaults to ``config.patch_nums``.
        Returns:
            :class:`HARTTransformerOutput` with logits (B, sum(pn^2), V) and hidden states.
        """
        patch_nums = tuple(patch_nums or self.config.patch_nums)
        num_image = sum(pn * pn for pn in patch_nums)
        if scale_inputs.shape[1] != num_image - 1:
            raise ValueError(
                f"scale_inputs has {scale_inputs.shape[1]} tokens; patch_nums {patch_nums} needs "
                f"sum(pn^2) - 1 = {num_image - 1}."
            )
        num_scales, T = len(patch_nums), context.shape[1]
        levels = torch.cat([torch.zeros(T, dtype=torch.long)] +
                           [torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums) if si]).to(self.device)
        level_emb = self.scale_embeddings(num_scales)[levels]  # (L, C)
        condition = self.embed_context(context)
        x = torch.cat([condition, self.word_embed(scale_inputs.to(self.dtype))], dim=1) + level_emb
        text_cos, text_sin = self.text_rope(context_position_ids)
        img_cos, img_sin = self.image_rope(patch_nums, range(1, num_scales), context_position_ids)
        cos, sin = torch.cat([text_cos, img_cos], 1), torch.cat([text_sin, img_sin], 1)
        block_ends = [T + sum(pn * pn for pn in patch_nums[1:si + 1]) for si in range(num_scales)]  # block-causal
        h = self.run_blocks(x, cos, sin, block_ends=block_ends)[:, T - 1:]
        logits = self.logits(h, self.head_modulation(condition))
        if not return_dict:
            return logits, h
        return HARTTransformerOutput(logits=logits, hidden_states=h)

    def residual_condition(self, hidden_states: torch.Tensor, discrete_tokens: torch.Tensor) -> torch.Tensor:
        """Condition of the residual diffusion head: ``decoder_norm(h + word_embed(codebook[idx]))``.

        hidden_states (N, l, C) of the final scale; discrete_tokens (N, l, Cv) the codebook vectors of
        the chosen (hard) indices.
        """
        return self.decoder_norm(hidden_states + self.word_embed(discrete_tokens.to(self.dtype)))


__all__ = ["HARTTransformer", "HARTTransformerOutput", "KVCache"]
