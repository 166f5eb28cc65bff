"""Building blocks shared by the HART transformer and the residual diffusion head.

Numerics follow the official code (fp32 statistics in RMSNorm, fp32 rotary tables cast to the
activation dtype); the hot ops dispatch to :mod:`hart_pipeline.kernels`.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import kernels


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` with the statistics in fp32.

    The normalised value is cast back to the input dtype before the weight is applied (Llama
    convention, what the official fused kernel computes).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` in one pass (a forward
        call either way, so offload hooks see it)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE-style sinusoid of scalar positions ``t`` (N,) -> (N, dim), cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoid (256 frequencies) followed by ``Linear -> SiLU -> Linear``.

    Embeds the diffusion timestep in the residual head and the scale index ("level") in the
    transformer.
    """

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].bias.dtype  # the model's dtype, also when the weight is int8 (quantize_int8_)
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim).to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (B, H, L, hd) and tables (B, L, hd)."""
    return kernels.rope(x, cos, sin)


def text_rope(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """1D RoPE tables for text tokens: position_ids (B, T) -> cos, sin (B, T, hd)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def image_positions(patch_num: int, last_patch_num: int, device: torch.device) -> torch.Tensor:
    """Grid positions of one scale on the final ``last_patch_num`` frame: (pn^2, 2) fp32 (row, col)."""
    r = torch.arange(patch_num, device=device)
    grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)
    return grid / patch_num * last_patch_num


def image_rope(positions: torch.Tensor, offset: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables for image tokens.

    positions (L, 2) from :func:`image_positions`; offset (B,) = position id of the last text slot of
    each row (every scale starts right after the text). Returns cos, sin (B, L, hd) laid out as
    ``[row*f, row*f, col*f, col*f]`` (four blocks of hd/4): the official layout the weights expect.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.int64, device=positions.device).float() / head_dim))
    pos = positions[None] + offset[:, None, None]  # (B, L, 2) fp32
    angles = pos[..., None] * inv_freq  # (B, L, 2, hd/4)
    angles = torch.cat((angles, angles), dim=-1).flatten(-2)  # (B, L, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


__all__ = [
    "RMSNorm",
    "TimestepEmbedding",
    "apply_rope",
    "image_positions",
    "image_rope",
    "modulate",
    "sinusoidal_embedding",
    "text_rope",
]
