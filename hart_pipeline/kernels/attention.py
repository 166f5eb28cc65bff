"""Attention backends for HART: PyTorch SDPA (default), xformers, or the explicit reference ("math").

``block_ends`` expresses HART's block-causal pattern without a dense L x L mask: tokens are ordered by
scale, and a query of a block attends to every key up to the end of its block, so each block is one
unmasked attention over a key prefix.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "math")


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {BACKENDS}.")
    if name == "xformers" and not _xformers_available():
        raise ValueError("The xformers backend needs `pip install xformers`; use 'sdpa' otherwise.")
    return name


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Unmasked attention of q (B, H, Lq, hd) over k, v (B, H, Lk, hd) -> (B, H, Lq, hd)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    weights = (q * scale) @ k.transpose(-2, -1)
    return weights.softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "sdpa",
              block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Softmax attention; with ``block_ends`` (increasing, last = L) the block-causal pattern by scale."""
    if block_ends is None:
        return _attend(q, k, v, scale, backend)
    outputs, start = [], 0
    for end in block_ends:
        outputs.append(_attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale, backend))
        start = end
    return torch.cat(outputs, dim=2)
