"""Kernels for HART's hot paths, with a plain PyTorch fallback that is always correct.

Fused Triton kernels (RMSNorm with the residual add, RoPE) are used automatically for CUDA tensors when
Triton is installed; ``set_fused_kernels(False)`` or ``HART_DISABLE_TRITON=1`` switches them off.
"""

import os
from typing import Tuple

import torch

from . import reference
from .attention import attention

try:
    from . import triton_kernels
except ImportError:  # Triton is optional
    triton_kernels = None

_fused_enabled = os.environ.get("HART_DISABLE_TRITON", "0") != "1"


def set_fused_kernels(enabled: bool) -> None:
    """Turn the Triton kernels on or off (they are only ever used for CUDA tensors)."""
    global _fused_enabled
    _fused_enabled = enabled


def fused_available() -> bool:
    return triton_kernels is not None


def _use_fused(x: torch.Tensor) -> bool:
    return _fused_enabled and triton_kernels is not None and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (triton_kernels if _use_fused(x) else reference).rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return (triton_kernels if _use_fused(x) else reference).add_rms_norm(x, residual, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (triton_kernels if _use_fused(x) else reference).rope(x, cos, sin)


__all__ = ["add_rms_norm", "attention", "fused_available", "rms_norm", "rope", "set_fused_kernels"]
