"""HART's attention through diffusers' ``dispatch_attention_fn``, with the block-causal pattern by scale.

The backend is diffusers' (``"native"`` SDPA by default, ``"flash"``, ``"_flash_3_hub"``, ``"sage"``,
``"xformers"``, ``"_native_math"``...): set per model with ``transformer.set_attention_backend(name)``,
for a region with ``diffusers.attention_backend(name)``, or globally with ``DIFFUSERS_ATTN_BACKEND``.

``block_ends`` expresses HART's block-causal pattern without a dense L x L mask: tokens are ordered by
scale, and a query of a block attends to every key up to the end of its block, so each block is one
unmasked attention over a key prefix (any backend, no mask support needed).
"""

from typing import Optional, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: Optional[str] = None,
              block_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Softmax attention of q (B, H, Lq, hd) over k, v (B, H, Lk, hd) -> (B, H, Lq, hd).

    ``backend`` None = diffusers' active backend. With ``block_ends`` (increasing, last = Lq = Lk) the
    block-causal pattern by scale.
    """

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # diffusers' layout is (B, L, H, hd); the native backend permutes back to these very tensors
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, backend=backend)
        return out.transpose(1, 2)

    if block_ends is None:
        return attend(q, k, v)
    outputs, start = [], 0
    for end in block_ends:
        outputs.append(attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end]))
        start = end
    return torch.cat(outputs, dim=2)
