"""Cheap previews of the coarse-to-fine build: the running latent decoded at a low resolution.

Decoding the full latent after every scale would cost a full-resolution decoder pass per scale (14 at
1024px). The latent is average-pooled to at most ``max_latent_side`` first, so a preview costs one decoder
pass at ``max_latent_side * downsample_factor`` pixels (256 px for the released model); latents that small
already (the built-in 64px model) are decoded exactly, so the last preview is the discrete image itself.
"""

import torch
import torch.nn.functional as F

from .models.tokenizer import HARTHybridTokenizer


@torch.no_grad()
def preview_images(tokenizer: HARTHybridTokenizer, latent: torch.Tensor, max_latent_side: int = 16) -> torch.Tensor:
    """(B, Cv, h, w) latent -> (B, 3, H', W') images in [0, 1], decoded from a latent of side <= ``max_latent_side``."""
    if max(latent.shape[-2:]) > max_latent_side:
        h, w = latent.shape[-2:]
        scale = max_latent_side / max(h, w)
        latent = F.adaptive_avg_pool2d(latent.float(), (max(1, round(h * scale)), max(1, round(w * scale))))
    return (tokenizer.decode_latent(latent).float() + 1) / 2
