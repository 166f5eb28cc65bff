"""Patch schedules (``patch_nums``): the side length of every token map, coarse to fine.

HART generates ``len(patch_nums)`` scales; the last one equals the latent side (image side / the tokenizer's
downsample factor, 16 for the released model).
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

PATCH_NUMS: Dict[int, Tuple[int, ...]] = {
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),  # released hart-0.7b-1024px
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # VAR-512 schedule
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # VAR default schedule
}


def standard_patch_nums(latent_side: int) -> Optional[Tuple[int, ...]]:
    """The standard schedule that ends at ``latent_side`` (any tokenizer downsample factor), or None."""
    return next((pns for pns in PATCH_NUMS.values() if pns[-1] == latent_side), None)


def patch_nums_for_resolution(resolution: int, downsample_factor: int = 16) -> Tuple[int, ...]:
    """The standard patch schedule for a square image side; raises a ValueError naming the valid sides.

    ``downsample_factor`` is the tokenizer's image side / latent side (16 for the released model).
    """
    patch_nums = standard_patch_nums(resolution // downsample_factor) if resolution % downsample_factor == 0 else None
    if patch_nums is None:
        valid = ", ".join(str(pns[-1] * downsample_factor) for pns in sorted(PATCH_NUMS.values(), key=lambda p: p[-1]))
        raise ValueError(f"HART generates square images of side {valid}; got {resolution}.")
    return patch_nums


def supported_sizes(own_patch_nums: Sequence[int], downsample_factor: int) -> Dict[int, Tuple[int, ...]]:
    """Square image side -> patch schedule for a model: its own schedule and the standard ones (a standard
    schedule ending at the same side takes precedence, as the pipeline always did).

    A schedule's last side is the latent side, so the image side is ``patch_nums[-1] * downsample_factor``
    (the built-in tokenizer downsamples by 8, the released one by 16).
    """
    schedules = [tuple(own_patch_nums)] + [PATCH_NUMS[r] for r in sorted(PATCH_NUMS)]
    sizes: Dict[int, Tuple[int, ...]] = {}
    for pns in schedules:
        sizes[pns[-1] * downsample_factor] = pns
    return sizes


def phi_index(scale_index: int, num_scales: int, num_phi: int = 4) -> int:
    """Which of the ``num_phi`` shared phi convs refines scale ``scale_index`` (VAR's partial sharing).

    The convs sit at ticks evenly spread over (0, 1) (margins ``1/(3K)`` for K = 4, else ``1/(2K)``,
    as in VAR); a scale takes the tick nearest to ``scale_index / (num_scales - 1)``, the first on ties.
    """
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(margin, 1 - margin, num_phi)
    position = scale_index / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - position)))


def num_tokens(patch_nums: Sequence[int]) -> int:
    """Total number of image tokens over all scales."""
    return sum(pn * pn for pn in patch_nums)
