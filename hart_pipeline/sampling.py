"""HART's two-stage sampling: next-scale AR prediction of discrete tokens, then residual diffusion.

These are plain functions shared by :class:`~hart_pipeline.HARTPipeline` and the ComfyUI nodes.
Defaults reproduce the official ``autoregressive_infer_cfg`` (commit e28a41f) including its quirks,
which the released weights were tuned with:

* the guidance ramps linearly from 0 at the first scale to ``cfg * (SN-2)/(SN-1)`` at the last loop
  scale, and the final scale reuses that (stale) ratio;
* top-k is 600 for the first 7 scales and 300 after (``top_k=None``); an explicit ``top_k`` is honoured;
* the "smooth" option feeds a Gumbel-softmax mixture of the *filtered* logits to the next scale while
  the hard sample still conditions the residual head;
* the unconditional rows use an all-zero text condition with position ids 0.
"""

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from diffusers.utils import BaseOutput

from .models.residual_head import HARTResidualHead
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .scheduler import HARTResidualScheduler


@dataclass
class HARTTokens(BaseOutput):
    """The hybrid tokens of a batch of images.

    Args:
        indices: per-scale discrete indices, each (B, pn^2) int64, coarse to fine.
        latent: (B, Cv, h, w) the discrete part of the latent as the AR stage accumulated it (with the
            "smooth" option the scales contribute soft codebook mixtures).
        residual: (B, Cv, h, w) the continuous residual, or None before the residual stage.
        residual_condition: (2B, pn_last^2, C) the residual head's condition for the conditional and
            unconditional rows, or None (tokens from the tokenizer's encoder).
        residual_guidance: the guidance weight the residual stage uses (the final scale's).
    """

    indices: List[torch.Tensor]
    latent: torch.Tensor
    residual: Optional[torch.Tensor] = None
    residual_condition: Optional[torch.Tensor] = None
    residual_guidance: float = 0.0


def guidance_ramp(guidance_scale: float, num_scales: int) -> List[float]:
    """Guidance weight of every scale: ``cfg * si / (SN-1)`` for the loop scales, stale at the last."""
    ratios = [si / (num_scales - 1) for si in range(num_scales - 1)]
    ratios.append(ratios[-1])
    return [guidance_scale * r for r in ratios]


def default_top_k(scale_index: int) -> int:
    """The official hard-coded top-k: 600 for the first seven scales, 300 after."""
    return 600 if scale_index < 7 else 300


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k (ties at the threshold kept) then top-p filtering of (B, l, V) logits; removed -> -inf."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        threshold = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def _on_generator_device(fn: Callable[[torch.device], torch.Tensor], generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Draw with ``fn(device)`` on the generator's device (CPU generators stay reproducible), then move."""
    draw_device = generator.device if generator is not None else device
    return fn(draw_device).to(device)


def sample_scale_tokens(
    logits: torch.Tensor,
    codebook: torch.Tensor,
    top_k: int,
    top_p: float,
    smooth: bool,
    ratio: float,
    generator: Optional[torch.Generator],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample one scale from guided logits (B, l, V).

    Returns the hard indices (B, l) and the token embeddings (B, l, Cv): codebook rows, or with
    ``smooth`` the Gumbel-softmax mixture at temperature ``max(0.27 (1 - 0.95 ratio), 0.005)`` of the
    filtered logits scaled by ``1 + ratio``. Random draws, in order: the multinomial, then (smooth) the
    exponential noise, both from ``generator``.
    """
    B, l, V = logits.shape
    filtered = filter_logits(logits, top_k, top_p)
    probs = filtered.softmax(dim=-1).view(-1, V)
    idx = _on_generator_device(
        lambda d: torch.multinomial(probs.to(d), 1, replacement=True, generator=generator), generator, logits.device
    ).view(B, l)
    if not smooth:
        return idx, codebook[idx]
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    exponential = _on_generator_device(
        lambda d: torch.empty(filtered.shape, device=d).exponential_(generator=generator), generator, logits.device
    )
    weights = ((filtered * (1 + ratio) - exponential.log()) / tau).softmax(dim=-1)
    return idx, (weights @ codebook.float()).to(codebook.dtype)


@torch.no_grad()
def generate_tokens(
    transformer: HARTTransformer,
    tokenizer: HARTHybridTokenizer,
    context: torch.Tensor,
    context_position_ids: torch.Tensor,
    negative_context: Optional[torch.Tensor] = None,
    negative_position_ids: Optional[torch.Tensor] = None,
    patch_nums: Optional[Sequence[int]] = None,
    guidance_scale: float = 4.5,
    top_k: Optional[int] = None,
    top_p: float = 0.0,
    smooth: bool = True,
    generator: Optional[torch.Generator] = None,
    prefix_indices: Optional[Sequence[torch.Tensor]] = None,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> HARTTokens:
    """The AR stage: predict every scale's discrete tokens with classifier-free guidance.

    Args:
        context: (B, T, Ct) text hidden states; context_position_ids (B, T) int64.
        negative_context / negative_position_ids: the unconditional rows; default (official) all-zero
            hidden states with position ids 0.
        patch_nums: patch schedule; defaults to the transformer's.
        top_k: None = the official schedule (600, then 300 from scale 7); 0 disables top-k.
        prefix_indices: indices (B, pn^2) of the first scales to keep instead of sampling them, e.g.
            from ``vae.encode`` to regenerate only the fine scales of an image (teacher forcing when
            every scale is given). No random numbers are drawn for those scales.
        callback: called as ``callback(scale_index, num_scales, f_hat)`` after every scale, with the
            running latent (B, Cv, h, w) (progress bars, interrupts, previews; in-place edits are kept).
    Returns:
        :class:`HARTTokens` without the residual, with the residual head's condition.
    """
    patch_nums = tuple(patch_nums or transformer.config.patch_nums)
    if negative_context is None:
        negative_context = torch.zeros_like(context)
        negative_position_ids = torch.zeros_like(context_position_ids)
    B, T, _ = context.shape
    num_scales, last = len(patch_nums), patch_nums[-1]
    quantizer = tokenizer.quantizer
    codebook = quantizer.embedding.weight
    ramp = guidance_ramp(guidance_scale, num_scales)
    prefix = list(prefix_indices or [])
    if len(prefix) > num_scales or any(p.shape != (B, pn * pn) for p, pn in zip(prefix, patch_nums)):
        raise ValueError(
            f"prefix_indices must be at most {num_scales} tensors shaped (B, pn^2) for patch_nums {patch_nums}; got "
            f"{[tuple(p.shape) for p in prefix]}."
        )

    contexts = torch.cat([context, negative_context])  # (2B, T, Ct)
    position_ids = torch.cat([context_position_ids, negative_position_ids]).to(context.device)
    kv_cache = transformer.new_kv_cache(2 * B, patch_nums, T, device=context.device)

    f_hat = torch.zeros(B, codebook.shape[1], last, last, device=codebook.device, dtype=codebook.dtype)
    scale_input = None
    indices: List[torch.Tensor] = []
    for si, pn in enumerate(patch_nums):
        ratio = min(si, num_scales - 2) / (num_scales - 1)
        # every transformer computation is a forward call: offload hooks see it
        logits, h = transformer(contexts, position_ids, scale_input, patch_nums, return_dict=False, kv_cache=kv_cache,
                                scale_index=si)
        if si < len(prefix):
            idx = prefix[si].to(codebook.device)
            tokens = codebook[idx]
        else:
            t = ramp[si]
            guided = (1 + t) * logits[:B] - t * logits[B:]
            k = default_top_k(si) if top_k is None else top_k
            idx, tokens = sample_scale_tokens(guided, codebook, k, top_p, smooth, ratio, generator)
        indices.append(idx)
        tokens = tokens.transpose(1, 2).reshape(B, -1, pn, pn)
        f_hat = quantizer.add_scale(f_hat, tokens, si, patch_nums)
        if callback is not None:
            callback(si, num_scales, f_hat)
        if si < num_scales - 1:
            scale_input = quantizer.next_scale_input(f_hat, patch_nums[si + 1])
    (residual_condition,) = transformer(None, position_ids, patch_nums=patch_nums, return_dict=False, kv_cache=kv_cache,
                                        residual_tokens=codebook[idx].repeat(2, 1, 1))
    return HARTTokens(indices=indices, latent=f_hat, residual_condition=residual_condition, residual_guidance=ramp[-1])


def guided_head_output(head: HARTResidualHead, x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor,
                       guidance_scale: float) -> torch.Tensor:
    """Guided ``[eps | v]`` (N, 2 Cv) for noisy residuals x (N, Cv) under conditions (2N, C) [cond; uncond].

    The head runs on ``[x; x]``; eps is mixed as ``(1 + g) eps_c - g eps_u``; v stays the conditional one.
    """
    N, channels = x.shape
    out = head(torch.cat([x, x]).to(head.dtype), timestep, condition.to(head.dtype)).float()
    eps = (1 + guidance_scale) * out[:N, :channels] - guidance_scale * out[N:, :channels]
    return torch.cat([eps, out[:N, channels:]], dim=-1)


@torch.no_grad()
def sample_residual(
    head: HARTResidualHead,
    scheduler: HARTResidualScheduler,
    condition: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int = 8,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    callback: Optional[Callable[[int, int, torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """The residual stage: denoise one residual token per condition row with guidance.

    Args:
        condition: (2N, C): N conditional rows then their N unconditional rows.
        guidance_scale: HART convention ``(1 + g) eps_c - g eps_u``. Exactly 1.0 reproduces the
            official discontinuity (no guidance at all).
        callback: called as ``callback(step_index, timestep, sample)`` after every step with the (N, Cv)
            sample in the head's units; a returned tensor replaces the sample.
    Returns:
        (N, Cv) residual tokens, already multiplied by ``residual_scale``.
    Random draws, in order, from ``generator``: the initial noise (N, Cv) (2N with g == 1), then
    every step's noise for all 2N rows, the last step included (as the official sampler draws them;
    only the conditional rows are kept).
    """
    N = condition.shape[0] // 2
    channels = head.config.latent_channels
    device, dtype = condition.device, head.dtype
    guided = guidance_scale != 1.0

    def randn(rows: int) -> torch.Tensor:
        return _on_generator_device(lambda d: torch.randn(rows, channels, generator=generator, device=d), generator, device)

    scheduler = copy.copy(scheduler)  # set_timesteps rebinds the tables: concurrent calls never share them
    scheduler.set_timesteps(num_inference_steps)
    x = randn(N if guided else 2 * N)[:N]
    condition = condition.to(dtype) if guided else condition[:N].to(dtype)
    for i, t in enumerate(scheduler.timesteps):
        timestep = torch.full((2 * N if guided else N,), int(t), device=device, dtype=torch.long)
        out = guided_head_output(head, x, timestep, condition, guidance_scale) if guided else head(x.to(dtype), timestep, condition).float()
        x = scheduler.step(out, t, x, noise=randn(2 * N)[:N], temperature=temperature).prev_sample
        if callback is not None:
            replaced = callback(i, int(t), x)
            x = x if replaced is None else replaced
    return x * head.config.residual_scale


def add_residual(
    tokens: HARTTokens,
    head: HARTResidualHead,
    scheduler: HARTResidualScheduler,
    num_inference_steps: int = 8,
    guidance_scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, int, torch.Tensor], Optional[torch.Tensor]]] = None,
) -> HARTTokens:
    """Fill in the continuous residual of AR-stage tokens (guidance defaults to the final scale's).

    ``callback``: as in :func:`sample_residual`, with the sample as a map (B, Cv, h, w).
    """
    if tokens.residual_condition is None:
        raise ValueError("These tokens carry no residual condition; they must come from generate_tokens().")
    B, Cv, h, w = tokens.latent.shape
    g = tokens.residual_guidance if guidance_scale is None else guidance_scale

    def to_map(x: torch.Tensor) -> torch.Tensor:  # (B * h * w, Cv) -> (B, Cv, h, w)
        return x.view(B, h * w, Cv).transpose(1, 2).reshape(B, Cv, h, w)

    def on_step(i: int, t: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        replaced = callback(i, t, to_map(x))
        return None if replaced is None else replaced.reshape(B, Cv, h * w).transpose(1, 2).reshape(-1, Cv)

    res = sample_residual(head, scheduler, tokens.residual_condition.flatten(0, 1), g, num_inference_steps,
                          generator, callback=None if callback is None else on_step)
    residual = to_map(res).to(tokens.latent.dtype)
    return HARTTokens(indices=tokens.indices, latent=tokens.latent, residual=residual,
                      residual_condition=tokens.residual_condition, residual_guidance=g)


@torch.no_grad()
def encode_images(tokenizer: HARTHybridTokenizer, images: torch.Tensor, patch_nums: Optional[Sequence[int]] = None) -> HARTTokens:
    """Images in [0, 1] (B, 3, H, W) -> hybrid tokens: the inverse of :func:`decode_tokens`."""
    indices, residual = tokenizer.encode(images * 2 - 1, patch_nums, return_dict=False)
    latent = tokenizer.quantizer.indices_to_latent(indices, tokenizer.patch_nums_from_indices(indices))
    return HARTTokens(indices=indices, latent=latent, residual=residual)


@torch.no_grad()
def decode_tokens(tokenizer: HARTHybridTokenizer, tokens: HARTTokens, discrete_only: bool = False) -> torch.Tensor:
    """Hybrid tokens -> images in [0, 1] (B, 3, H, W); ``discrete_only`` drops the residual."""
    latent = tokens.latent if discrete_only or tokens.residual is None else tokens.latent + tokens.residual
    return (tokenizer.decode_latent(latent) + 1) / 2
