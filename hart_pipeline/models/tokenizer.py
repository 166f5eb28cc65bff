"""HART hybrid tokenizer: a VQGAN-style autoencoder with a multi-scale residual quantizer.

An image is encoded to a continuous latent ``f`` (B, Cv, h, w), ``h = w = side / 16`` for the release.
``f`` is split into discrete tokens at every scale of a patch schedule (VAR-style residual
quantization with shared "phi" convs) plus a continuous residual ``r`` that the discrete tokens
miss. The AR transformer predicts the tokens, the residual diffusion head predicts ``r``; decoding
``sum of discrete scales + r`` reproduces ``f``.

Numerics follow the official ``HARTAutoEncoder`` / ``HARTHybridQuantizer``
(``img_to_idxBl_and_frest``, ``get_next_autoregressive_input``, ``idxBl_to_var_input``), so the
indices match the official tokenizer exactly in fp32. The state-dict keys of ``encoder``,
``decoder``, ``quant_conv`` and ``post_quant_conv`` equal the official ``vae.*`` keys; the
quantizer's ``vae.quantize.embedding`` and ``vae.quantize.quant_resi.qresi_ls.{k}`` map to
``quantizer.embedding`` and ``quantizer.phis.{k}``.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..loading import StrictLoadingMixin
from ..schedules import PATCH_NUMS, phi_index, standard_patch_nums
from ..validation import check_config, int_list, positive_int, real

CONFIG_RULES = {
    "in_channels": positive_int(64), "latent_channels": positive_int(4096), "vocab_size": positive_int(1 << 20),
    "base_channels": positive_int(4096), "channel_multipliers": int_list(1, 64), "num_res_blocks": positive_int(64),
    "quant_resi": real(-1.0, 1.0), "num_phi": positive_int(64), "patch_nums": int_list(1, 1024, increasing=True),
}


@dataclass
class HybridTokens(BaseOutput):
    """Output of :meth:`HARTHybridTokenizer.encode`.

    Args:
        indices: one ``(B, pn * pn)`` int64 tensor per scale, coarse to fine, row-major.
        residual: ``(B, Cv, h, w)`` continuous residual ``f - f_hat_discrete``.
    """

    indices: List[torch.LongTensor]
    residual: torch.Tensor


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; 1x1 shortcut only when channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # inference: no fresh tensor per activation (as the official code)
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.nin_shortcut(x)) if inplace else self.nin_shortcut(x) + h


class _AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv conv and a residual connection.

    Written with explicit ``bmm`` / ``softmax`` in the official order so that the encoder latents (and
    hence the token indices) match the official tokenizer bit for bit.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.scale = channels**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, height * width).unbind(1)  # 3 x (B, C, HW)
        q = q.contiguous().transpose(1, 2).contiguous()  # (B, HW, C)
        weights = torch.bmm(q, k.contiguous()).mul_(self.scale).softmax(dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v.contiguous(), weights.transpose(1, 2).contiguous())  # (B, C, HW_q)
        return x + self.proj_out(h.view(b, c, height, width))


class _Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv (halves the side)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class _Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResnetBlocks, each followed by an AttnBlock when ``with_attention``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attention: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [_ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)]
        )
        self.attn = nn.ModuleList([_AttnBlock(out_channels) for _ in range(num_blocks)] if with_attention else [])
        self.gradient_checkpointing = False  # enable_gradient_checkpointing(): recompute each block in backward

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, x)
        return module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = self._run(block, x)
            if len(self.attn) > 0:
                x = self._run(self.attn[i], x)
        return x


class _MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels)
        self.attn_1 = _AttnBlock(channels)
        self.block_2 = _ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, Cv, H / 2^(L-1), W / 2^(L-1)); attention only at the last level."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
    ):
        super().__init__()
        num_levels = len(channel_multipliers)
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        channels = base_channels
        for i, mult in enumerate(channel_multipliers):
            out_channels = base_channels * mult
            level = _Level(channels, out_channels, num_res_blocks, with_attention=i == num_levels - 1)
            if i != num_levels - 1:
                level.downsample = _Downsample(out_channels)
            self.down.append(level)
            channels = out_channels
        self.mid = _MidBlock(channels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class _Decoder(nn.Module):
    """Latent (B, Cv, h, w) -> image (B, out_channels, h * 2^(L-1), w * 2^(L-1)).

    ``up.{i}`` is level ``i`` (same numbering as the encoder) although the levels run from the last
    to the first; each has ``num_res_blocks + 1`` ResnetBlocks.
    """

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
    ):
        super().__init__()
        num_levels = len(channel_multipliers)
        channels = base_channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(latent_channels, channels, kernel_size=3, padding=1)
        self.mid = _MidBlock(channels)
        levels = []
        for i in reversed(range(num_levels)):
            level_channels = base_channels * channel_multipliers[i]
            level = _Level(channels, level_channels, num_res_blocks + 1, with_attention=i == num_levels - 1)
            if i != 0:
                level.upsample = _Upsample(level_channels)
            levels.insert(0, level)
            channels = level_channels
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class HybridQuantizer(nn.Module):
    """Multi-scale residual quantizer with ``num_phi`` partially shared phi convs (HART / VAR).

    Scale ``si`` of a schedule ``patch_nums`` (SN scales, last side = latent side) quantizes the
    area-downsampled residual to ``pn x pn`` codes; its contribution to the running latent
    ``f_hat`` is ``phi_k(bicubic_up(codes))`` for ``si < SN - 1`` and the raw codes (no
    interpolation, no phi) at the last scale -- the convention of the AR sampler and of
    ``img_to_idxBl_and_frest``.
    """

    def __init__(self, vocab_size: int, latent_channels: int, quant_resi: float, num_phi: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.resi_ratio = abs(quant_resi)
        self.num_phi = num_phi
        self.embedding = nn.Embedding(vocab_size, latent_channels)
        self.phis = nn.ModuleList(
            [nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1) for _ in range(num_phi)]
        )

    def phi(self, h_BChw: torch.Tensor, scale_index: int, num_scales: int) -> torch.Tensor:
        """``(1 - q) * h + q * conv_k(h)`` with the conv ``k`` assigned to this scale."""
        conv = self.phis[phi_index(scale_index, num_scales, self.num_phi)]
        return h_BChw.mul(1 - self.resi_ratio) + conv(h_BChw).mul_(self.resi_ratio)

    def lookup(self, latent_BChw: torch.Tensor) -> torch.LongTensor:
        """Nearest codebook entry per position: (B, Cv, h, w) -> (B, h * w), first index on ties.

        The squared distance ``|z|^2 + |e|^2 - 2 z.e`` is formed in the official op order, in fp32.
        """
        b, c, height, width = latent_BChw.shape
        z_NC = latent_BChw.detach().float().permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, Cv)
        codebook = self.embedding.weight.detach().float()  # (V, Cv)
        distance = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
        distance.addmm_(z_NC, codebook.T, alpha=-2, beta=1)  # (B*h*w, V)
        return torch.argmin(distance, dim=1).view(b, height * width)

    def _to_BChw(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, pn * pn, Cv) token map -> (B, Cv, pn, pn); (B, Cv, pn, pn) passes through."""
        if tokens.ndim == 4:
            return tokens
        b, length, c = tokens.shape
        pn = math.isqrt(length)
        if pn * pn != length:
            raise ValueError(f"A token map must hold a square number of tokens; got {length}.")
        return tokens.view(b, pn, pn, c).permute(0, 3, 1, 2)

    def _contribution(self, tokens: torch.Tensor, scale_index: int, patch_nums: Sequence[int]) -> torch.Tensor:
        """What scale ``scale_index`` adds to ``f_hat``: (B, Cv, h, w)."""
        h_BChw = self._to_BChw(tokens)
        num_scales, side = len(patch_nums), patch_nums[-1]
        if scale_index == num_scales - 1:
            return h_BChw
        if h_BChw.shape[-1] != side:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic", align_corners=False)
        return self.phi(h_BChw.contiguous(), scale_index, num_scales)

    def add_scale(
        self, f_hat: torch.Tensor, tokens: torch.Tensor, scale_index: int, patch_nums: Sequence[int]
    ) -> torch.Tensor:
        """Add scale ``scale_index``'s token map, (B, Cv, pn, pn) or (B, pn^2, Cv), to ``f_hat`` (B, Cv, h, w)."""
        return f_hat + self._contribution(tokens.to(f_hat.dtype), scale_index, patch_nums)

    @staticmethod
    def next_scale_input(f_hat: torch.Tensor, next_pn: int) -> torch.Tensor:
        """Area-downsample ``f_hat`` (B, Cv, h, w) to the next scale: (B, next_pn^2, Cv), row-major."""
        return F.interpolate(f_hat, size=(next_pn, next_pn), mode="area").flatten(2).transpose(1, 2)

    def quantize(
        self, latent_f: torch.Tensor, patch_nums: Sequence[int]
    ) -> Tuple[List[torch.LongTensor], torch.Tensor]:
        """Split ``latent_f`` (B, Cv, h, w) into per-scale indices and the continuous residual (B, Cv, h, w).

        Runs in the codebook's dtype (fp32 unless the whole model was cast), as the official quantizer
        runs in fp32 whatever the encoder's precision.
        """
        num_scales = len(patch_nums)
        rest = latent_f.to(self.embedding.weight.dtype, copy=True)
        indices = []
        for si, pn in enumerate(patch_nums):
            z = rest if si == num_scales - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            idx_Bl = self.lookup(z)  # (B, pn^2)
            indices.append(idx_Bl)
            rest = rest - self._contribution(self.embedding(idx_Bl).to(rest.dtype), si, patch_nums)
        return indices, rest

    def indices_to_latent(self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> torch.Tensor:
        """Discrete latent ``f_hat`` (B, Cv, h, w): the sum of every scale's contribution."""
        side = patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(indices[0].shape[0], self.latent_channels, side, side)
        for si, idx_Bl in enumerate(indices):
            f_hat = self.add_scale(f_hat, self.embedding(idx_Bl), si, patch_nums)
        return f_hat

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> torch.Tensor:
        """AR inputs for scales 1..SN-1 given ground-truth indices: (B, sum(pn^2 for pn in patch_nums[1:]), Cv).

        The input of scale ``si + 1`` is ``f_hat`` after scales 0..si, area-downsampled to ``pn_{si+1}``.
        """
        side = patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(indices[0].shape[0], self.latent_channels, side, side)
        inputs = []
        for si in range(len(patch_nums) - 1):
            f_hat = self.add_scale(f_hat, self.embedding(indices[si]), si, patch_nums)
            inputs.append(self.next_scale_input(f_hat, patch_nums[si + 1]))
        if not inputs:
            return f_hat.new_zeros(f_hat.shape[0], 0, self.latent_channels)
        return torch.cat(inputs, dim=1)


class HARTHybridTokenizer(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""The HART hybrid tokenizer (discrete multi-scale tokens + continuous residual).

    Loaded in a low ``dtype`` the quantizer (codebook, phi convs: the running latent ``f_hat``) stays
    fp32, as the official code runs it with autocast disabled.

    ``enable_gradient_checkpointing()`` recomputes the encoder / decoder blocks in the backward pass.

    Parameters:
        in_channels (`int`): image channels.
        latent_channels (`int`): latent / codebook channels ``Cv``.
        vocab_size (`int`): codebook size ``V``.
        base_channels (`int`): width of the first encoder level.
        channel_multipliers (`Tuple[int]`): width multiplier per level; the image side is reduced by
            ``2 ** (len(channel_multipliers) - 1)``.
        num_res_blocks (`int`): ResnetBlocks per encoder level (the decoder uses one more).
        quant_resi (`float`): phi mixing ratio ``q`` in ``(1 - q) * h + q * conv(h)``.
        num_phi (`int`): number of shared phi convs.
        patch_nums (`Tuple[int]`): default patch schedule (token-map sides, coarse to fine).
    """

    _config_rules = CONFIG_RULES
    _keep_in_fp32_modules = ["quantizer"]
    _no_split_modules = ["_ResnetBlock", "_AttnBlock", "HybridQuantizer"]
    _skip_layerwise_casting_patterns = ["quant_conv", "conv_in", "conv_out", "norm"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 32,
        vocab_size: int = 4096,
        base_channels: int = 160,
        channel_multipliers: Tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        quant_resi: float = 0.5,
        num_phi: int = 4,
        patch_nums: Tuple[int, ...] = PATCH_NUMS[1024],
    ):
        super().__init__()
        check_config("HARTHybridTokenizer", locals(), CONFIG_RULES)
        if base_channels % 32:
            raise ValueError("HARTHybridTokenizer config: `base_channels` must be a multiple of 32 (the blocks use "
                             f"GroupNorm(32)); got {base_channels}.")
        self.encoder = _Encoder(in_channels, latent_channels, base_channels, channel_multipliers, num_res_blocks)
        self.decoder = _Decoder(in_channels, latent_channels, base_channels, channel_multipliers, num_res_blocks)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1)
        self.quantizer = HybridQuantizer(vocab_size, latent_channels, quant_resi, num_phi)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.config.channel_multipliers) - 1)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`images` must have shape (B, {self.config.in_channels}, H, W); got {tuple(images.shape)}."
            )
        height, width = images.shape[-2:]
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"Image sides must be multiples of {factor}; got {height}x{width}.")

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``f = quant_conv(encoder(x))``: (B, C, H, W) in [-1, 1] -> (B, Cv, H/16, W/16)."""
        self._check_images(images)
        images = images.to(device=self.device, dtype=self.dtype)
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: (B, Cv, h, w) -> (B, C, h * 16, w * 16)."""
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"`latent` must have shape (B, {self.config.latent_channels}, h, w); got {tuple(latent.shape)}."
            )
        latent = latent.to(device=self.device, dtype=self.dtype)
        return self.decoder(self.post_quant_conv(latent)).clamp(-1, 1)

    def _resolve_patch_nums(self, patch_nums: Optional[Sequence[int]], image_size: Tuple[int, int]) -> Tuple[int, ...]:
        """The schedule to tokenize an image of ``image_size`` with; its last side must be the latent side."""
        height, width = image_size
        if height != width:
            raise ValueError(f"HART tokenizes square images; got {height}x{width}.")
        latent_side = height // self.downsample_factor
        if patch_nums is None:
            if self.config.patch_nums[-1] == latent_side:
                return tuple(self.config.patch_nums)
            standard = standard_patch_nums(latent_side)
            if standard is not None:
                return standard
        elif len(patch_nums) > 0 and patch_nums[-1] == latent_side:
            if any(not 0 < pn <= latent_side for pn in patch_nums):
                raise ValueError(f"Every patch side must lie in [1, {latent_side}]; got {tuple(patch_nums)}.")
            return tuple(patch_nums)
        got = tuple(self.config.patch_nums if patch_nums is None else patch_nums)
        raise ValueError(
            f"No patch schedule for a {height}x{width} image (latent side {latent_side}): `patch_nums` must end "
            f"with {latent_side}; got {got}."
        )

    def encode(
        self, images: torch.Tensor, patch_nums: Optional[Sequence[int]] = None, return_dict: bool = True
    ) -> Union[HybridTokens, Tuple[List[torch.LongTensor], torch.Tensor]]:
        """Hybrid tokenization: per-scale indices (B, pn^2) and the continuous residual (B, Cv, h, w).

        ``patch_nums`` defaults to the configured schedule when it fits the image, else to the
        standard schedule that ends at the latent side (image side / ``downsample_factor``).
        """
        self._check_images(images)
        patch_nums = self._resolve_patch_nums(patch_nums, tuple(images.shape[-2:]))
        latent = self.encode_latent(images)  # (B, Cv, h, w)
        indices, residual = self.quantizer.quantize(latent, patch_nums)
        if not return_dict:
            return indices, residual
        return HybridTokens(indices=indices, residual=residual)

    @staticmethod
    def patch_nums_from_indices(indices: Sequence[torch.Tensor]) -> Tuple[int, ...]:
        """Token-map sides from per-scale index tensors (B, pn^2), validating their shapes."""
        if len(indices) == 0:
            raise ValueError("`indices` must hold at least one scale.")
        batch_size = indices[0].shape[0]
        patch_nums = []
        for si, idx in enumerate(indices):
            if idx.ndim != 2 or idx.shape[0] != batch_size or idx.dtype.is_floating_point:
                raise ValueError(
                    f"indices[{si}] must be an integer tensor of shape ({batch_size}, pn * pn); "
                    f"got {idx.dtype} {tuple(idx.shape)}."
                )
            pn = math.isqrt(idx.shape[1])
            if pn * pn != idx.shape[1] or pn == 0:
                raise ValueError(f"indices[{si}] has {idx.shape[1]} tokens, not a positive square number.")
            patch_nums.append(pn)
        return tuple(patch_nums)

    def decode(
        self, indices: Sequence[torch.Tensor], residual: Optional[torch.Tensor] = None, return_dict: bool = True
    ) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Images in [-1, 1] from per-scale indices, plus the continuous residual when given (hybrid).

        Without ``residual`` this is the discrete-only reconstruction.
        """
        patch_nums = self.patch_nums_from_indices(indices)
        indices = [idx.to(device=self.device, dtype=torch.long) for idx in indices]
        f_hat = self.quantizer.indices_to_latent(indices, patch_nums)  # (B, Cv, h, w)
        if residual is not None:
            expected = (indices[0].shape[0], self.config.latent_channels, patch_nums[-1], patch_nums[-1])
            if tuple(residual.shape) != expected:
                raise ValueError(f"`residual` must have shape {expected}; got {tuple(residual.shape)}.")
            f_hat = f_hat + residual.to(device=f_hat.device, dtype=f_hat.dtype)
        images = self.decode_latent(f_hat)
        if not return_dict:
            return (images,)
        return DecoderOutput(sample=images)
