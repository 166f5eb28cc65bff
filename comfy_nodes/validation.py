"""Input checks of the HART nodes: every bad value becomes a ValueError that names the node input and the fix.

ComfyUI checks widget values against min/max only when they are typed in; values that arrive through a
link (a primitive, a math node, another pack's image) reach the node unchecked, so the nodes check them.
"""

import math
from typing import Dict, Iterable, Sequence, Tuple

import torch

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def check_seed(name: str, seed, allow_continue: bool = False) -> int:
    low = -1 if allow_continue else 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= MAX_SEED:
        hint = "-1 (continue the AR sampler's stream) or " if allow_continue else ""
        raise ValueError(f"`{name}` must be {hint}an integer in [0, 2^64 - 1]; got {seed!r}.")
    return seed


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 64:
        raise ValueError(f"`batch_size` must be a whole number from 1 to 64 (images per prompt); got {batch_size!r}.")
    return batch_size


def check_handle(name: str, value, cls: type, source: str):
    """``value`` is a ``cls`` (a HART_MODEL / HART_CONDITIONING / HART_TOKENS handle), else a clear error."""
    if not isinstance(value, cls):
        raise ValueError(f"`{name}` must be the output of {source}; got {type(value).__name__} {value!r:.60}.")
    return value


def check_number(name: str, value, low: float, high: float, high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
    if value < low or value > high or (value == high and not high_inclusive):
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"`{name}` must lie in [{low}, {high}{bracket}; got {value!r}.")
    return float(value)


def check_image(name: str, image) -> torch.Tensor:
    """A ComfyUI IMAGE: (B, H, W, C>=3) floats in [0, 1] without NaN."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"`{name}` must be a ComfyUI IMAGE: a float tensor (B, H, W, 3) in [0, 1]; got {got}.")
    if image.numel() == 0:
        raise ValueError(f"`{name}` is empty ({tuple(image.shape)}).")
    rgb = image[..., :3]
    if not torch.isfinite(rgb).all():
        raise ValueError(f"`{name}` contains NaN or infinite pixels.")
    low, high = rgb.min().item(), rgb.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        hint = " (it looks like 0..255: divide by 255)" if high > 1.5 else ""
        raise ValueError(f"`{name}` must hold values in [0, 1]; got [{low:.3g}, {high:.3g}]{hint}.")
    return image


def check_indices(name: str, indices: Sequence[torch.Tensor], vocab_size: int) -> None:
    """Per-scale token indices must address the model's codebook."""
    for si, idx in enumerate(indices):
        if idx.numel() and (idx.min().item() < 0 or idx.max().item() >= vocab_size):
            raise ValueError(
                f"`{name}` holds token indices in [{idx.min().item()}, {idx.max().item()}] at scale {si}; this model's "
                f"codebook has {vocab_size} entries (0..{vocab_size - 1}): the tokens come from another model."
            )


def check_size(name: str, side: int, sizes: Dict[int, Tuple[int, ...]], own: int, model_name: str,
               extra: Iterable[str] = ()) -> int:
    """``side`` must be one of the model's sizes; the message lists them (and ``extra`` choices such as auto)."""
    if side not in sizes:
        valid = ", ".join(list(extra) + [f"{s}{' (its own)' if s == own else ''}" for s in sorted(sizes)])
        raise ValueError(f"`{name}` = {side} is not a size of the HART model {model_name!r}; valid: {valid}.")
    return side
