"""Triton kernels (no build step): fused RMSNorm (+ residual add) and fused RoPE.

They compute exactly what :mod:`.reference` computes (same rounding points) in one pass over memory.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, n_cols, eps, HAS_RESIDUAL: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # round the sum to the activation dtype before the statistics, as the reference does
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * n_cols + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    tl.store(y_ptr + row * n_cols + offs, (x32 * inv).to(x.dtype) * w, mask=mask)


def _launch_rms(x: torch.Tensor, residual, weight: torch.Tensor, eps: float):
    x2 = x.contiguous().view(-1, x.shape[-1])
    y = torch.empty_like(x2)
    summed = torch.empty_like(x2) if residual is not None else y
    res2 = residual.contiguous().view(-1, x.shape[-1]) if residual is not None else x2
    block = triton.next_power_of_2(x2.shape[1])
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight.to(x.dtype).contiguous(), y, summed, x2.shape[1], eps,
                                     HAS_RESIDUAL=residual is not None, BLOCK=block)
    return y.view(x.shape), summed.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_rms(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_rms(x, residual, weight, eps)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, L, sxb, sxh, sxl, HALF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (b, h, l) row of head_dim values
    l = pid % L
    h = (pid // L) % H
    b = pid // (L * H)
    offs = tl.arange(0, HALF)
    x_row = x_ptr + b * sxb + h * sxh + l * sxl
    x1 = tl.load(x_row + offs)
    x2 = tl.load(x_row + HALF + offs)
    t_row = (b * L + l) * (2 * HALF)
    c1, c2 = tl.load(cos_ptr + t_row + offs), tl.load(cos_ptr + t_row + HALF + offs)
    s1, s2 = tl.load(sin_ptr + t_row + offs), tl.load(sin_ptr + t_row + HALF + offs)
    y_row = y_ptr + pid * (2 * HALF)
    tl.store(y_row + offs, x1 * c1 + (-x2) * s1)
    tl.store(y_row + HALF + offs, x2 * c2 + x1 * s2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd) with any strides but a unit last stride; tables (B, L, hd). Returns contiguous."""
    B, H, L, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, H, L, hd), dtype=x.dtype, device=x.device)
    cos = cos.to(x.dtype).expand(B, L, hd).contiguous()
    sin = sin.to(x.dtype).expand(B, L, hd).contiguous()
    _rope_kernel[(B * H * L,)](x, cos, sin, y, H, L, x.stride(0), x.stride(1), x.stride(2), HALF=hd // 2)
    return y
