"""Cheap previews of the coarse-to-fine build: a linear latent -> RGB map fitted once per tokenizer.

Decoding the running latent after every scale would cost a full decoder pass per scale (14 at 1024px).
Instead a per-channel linear map (Cv -> 3, plus a bias) is fitted by least squares to what the decoder
makes of flat codebook patches: the same idea as the latent-to-RGB factors image models ship for their
previews, but measured from the tokenizer itself, so it holds for any HART tokenizer.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models.tokenizer import HARTHybridTokenizer


@dataclass
class LatentRGBProjection:
    """``rgb = latent^T weight + bias`` per latent position, in the decoder's [-1, 1] range."""

    weight: torch.Tensor  # (Cv, 3) float32
    bias: torch.Tensor  # (3,) float32

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, Cv, h, w) latent -> (B, 3, h, w) images in [0, 1] at the latent resolution."""
        rgb = torch.einsum("bchw,cd->bdhw", latent.float().cpu(), self.weight) + self.bias.view(1, 3, 1, 1)
        return ((rgb + 1) / 2).clamp(0, 1)


@torch.no_grad()
def fit_latent_rgb_projection(tokenizer: HARTHybridTokenizer, num_maps: int = 4, cells: int = 4, cell_side: int = 4,
                              seed: int = 0) -> LatentRGBProjection:
    """Fit :class:`LatentRGBProjection` to decodes of random codebook patchworks.

    ``num_maps`` latent maps of ``cells x cells`` flat patches (``cell_side`` latent pixels each, one random
    codebook entry per patch) are decoded; each decoded image is average-pooled to the latent resolution
    and regressed on the latent (least squares with a bias). Deterministic for a given ``seed``.
    """
    codebook = tokenizer.quantizer.embedding.weight.float()  # (V, Cv)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, codebook.shape[0], (num_maps, cells, cells), generator=g)
    latent = codebook.cpu()[idx].permute(0, 3, 1, 2)  # (N, Cv, cells, cells)
    latent = latent.repeat_interleave(cell_side, 2).repeat_interleave(cell_side, 3)  # (N, Cv, s, s)
    images = tokenizer.decode_latent(latent.to(device=tokenizer.device, dtype=tokenizer.dtype)).float().cpu()
    target = F.adaptive_avg_pool2d(images, latent.shape[-2:])  # (N, 3, s, s)
    x = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)  # (N s s, Cv + 1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (Cv + 1, 3)
    return LatentRGBProjection(weight=solution[:-1].contiguous(), bias=solution[-1].contiguous())
