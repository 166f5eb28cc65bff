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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from .models.residual_head import HARTResidualHead
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .scheduler import HARTResidualScheduler
from .validation import check_residual_guidance, check_tensor


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
        residual_positions: boolean (B, h*w) masks of the final-scale positions whose residual the residual
            stage samples, one group after the other (the MaskGIT iterations, in their order); positions in
            no group keep ``residual`` (inpainting). None = every position, in one group.
    """

    indices: List[torch.Tensor]
    latent: torch.Tensor
    residual: Optional[torch.Tensor] = None
    residual_condition: Optional[torch.Tensor] = None
    residual_guidance: float = 0.0
    residual_positions: Optional[List[torch.Tensor]] = None


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


def maskgit_orders(batch_size: int, num_tokens: int, random_state: np.random.RandomState) -> torch.Tensor:
    """The official ``sample_orders``: one ``random_state.shuffle(arange(num_tokens))`` per row, (B, L) int64."""
    orders = []
    for _ in range(batch_size):
        order = np.arange(num_tokens)
        random_state.shuffle(order)
        orders.append(order)
    return torch.from_numpy(np.stack(orders)).long()


def maskgit_steps(orders: torch.Tensor, num_iters: int) -> List[torch.Tensor]:
    """Positions (B, n_k) predicted at each MaskGIT iteration of the final scale, sorted per row.

    The official cosine schedule: after iteration k the first ``floor(L cos(pi/2 (k+1)/K))`` entries of each
    row's order stay masked (at least one, and at least one fewer than before); the last iteration predicts
    everything still masked.
    """
    B, L = orders.shape
    masked = L
    steps = []
    for k in range(num_iters):
        if k == num_iters - 1:
            keep_masked = 0
        else:
            keep_masked = int(np.floor(L * np.cos(np.pi / 2.0 * (k + 1) / num_iters)))
            keep_masked = max(1, min(masked - 1, keep_masked))
        steps.append(orders[:, keep_masked:masked].sort(dim=1).values)
        masked = keep_masked
    return steps


def _gather_rows(x: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """x (N, l, ...) at per-row positions (N, n) -> (N, n, ...); None = all of x."""
    if positions is None:
        return x
    index = positions.to(x.device).view(*positions.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


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
    prefix_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    num_maskgit_iters: int = 1,
    maskgit_rng: Optional[np.random.RandomState] = None,
    guidance_stop_scale: Optional[int] = None,
    token_pruning: Optional[Dict[int, float]] = None,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> HARTTokens:
    """The AR stage: predict every scale's discrete tokens with classifier-free guidance.

    Args:
        context: (B, T, Ct) text hidden states; context_position_ids (B, T) int64.
        negative_context / negative_position_ids: the unconditional rows; default (official) all-zero
            hidden states with position ids 0.
        patch_nums: patch schedule; defaults to the transformer's.
        top_k: None = the official schedule (600, then 300 from scale 7); 0 disables top-k.
        prefix_indices: indices (B, pn^2) of the first scales to take from an image instead of sampling
            them, e.g. from ``vae.encode`` (teacher forcing; variations keep the coarse scales).
        prefix_masks: optional, one per given scale: a boolean (B, pn^2) map, True where the token of
            ``prefix_indices`` is kept and False where it is sampled (inpainting), or None to keep the whole
            scale. A scale kept whole draws no random numbers; a partly kept one samples every position
            (the same draws as without a prefix) and then restores the kept tokens.
        num_maskgit_iters: iterations of the official MaskGIT-style final scale (1 = all tokens at once,
            the official default). With K > 1 the final-scale tokens are predicted in K groups following a
            random order per image and the official cosine schedule; group k attends to groups < k.
        maskgit_rng: the numpy ``RandomState`` that shuffles those orders (the official code uses numpy's
            global one: ``np.random.RandomState(s)`` reproduces a run after ``np.random.seed(s)``). Default:
            a RandomState seeded with one draw from ``generator`` (only when K > 1), so the seed of
            ``generator`` alone fixes the result.
        guidance_stop_scale: opt-in speed-up (Switti, Voronov et al. 2024, arXiv 2412.01819): scales from this
            index on (and the residual stage, then unguided) run without classifier-free guidance, so the
            unconditional half of the batch is dropped. None (default) = guidance at every scale (official).
        token_pruning: opt-in speed-up (FastVAR, arXiv 2503.23367): ``{patch side: fraction pruned}``, e.g.
            ``{48: 0.5, 64: 0.75}`` (FastVAR's setting for HART 1024px); see :meth:`HARTTransformer.forward`.
            Not combinable with MaskGIT on the same (final) scale. None (default) = every token (official).
        callback: called as ``callback(scale_index, num_scales, f_hat)`` after every scale, with the
            running latent (B, Cv, h, w) (progress bars, interrupts, previews; in-place edits are kept).
    Returns:
        :class:`HARTTokens` without the residual, with the residual head's condition (and, with MaskGIT
        or masks, the groups of positions whose residual is sampled).
    """
    patch_nums = tuple(patch_nums or transformer.config.patch_nums)
    check_tensor("context", context, 3, hint=" Pass text hidden states (B, T, C), e.g. from pipe.encode_prompt.")
    if negative_context is not None:
        check_tensor("negative_context", negative_context, 3)
        if negative_context.shape != context.shape:
            raise ValueError(f"negative_context {tuple(negative_context.shape)} must have the shape of context "
                             f"{tuple(context.shape)} (B, T, C): encode both prompts with the same text encoder and "
                             "max_sequence_length.")
    if negative_context is None:
        negative_context = torch.zeros_like(context)
        negative_position_ids = torch.zeros_like(context_position_ids)
    B, T, _ = context.shape
    num_scales, last = len(patch_nums), patch_nums[-1]
    quantizer = tokenizer.quantizer
    codebook = quantizer.embedding.weight
    device = codebook.device
    ramp = guidance_ramp(guidance_scale, num_scales)
    prefix = list(prefix_indices or [])
    if len(prefix) > num_scales or any(p.shape != (B, pn * pn) for p, pn in zip(prefix, patch_nums)):
        raise ValueError(
            f"prefix_indices must be at most {num_scales} tensors shaped (B, pn^2) for patch_nums {patch_nums}; got "
            f"{[tuple(p.shape) for p in prefix]}."
        )
    masks = list(prefix_masks) if prefix_masks is not None else [None] * len(prefix)
    if len(masks) != len(prefix) or any(m is not None and m.shape != p.shape for m, p in zip(masks, prefix)):
        raise ValueError(
            f"prefix_masks must hold one (B, pn^2) boolean map (or None) per prefix_indices entry; got "
            f"{[None if m is None else tuple(m.shape) for m in masks]} for {[tuple(p.shape) for p in prefix]}."
        )
    if not isinstance(num_maskgit_iters, int) or not 1 <= num_maskgit_iters <= last * last:
        raise ValueError(f"num_maskgit_iters must be an integer in [1, {last * last}] (final-scale tokens); "
                         f"got {num_maskgit_iters!r}.")
    stop = num_scales if guidance_stop_scale is None else guidance_stop_scale
    if isinstance(stop, bool) or not isinstance(stop, int) or stop < 0:
        raise ValueError(f"guidance_stop_scale must be a scale index >= 0 (or None); got {guidance_stop_scale!r}.")
    pruning = dict(token_pruning or {})
    if any(pn not in patch_nums[2:] or not 0 <= r < 1 for pn, r in pruning.items()):
        raise ValueError(f"token_pruning maps patch sides of {patch_nums[2:]} (the third scale on) to fractions in "
                         f"[0, 1); got {token_pruning}.")
    if num_maskgit_iters > 1 and last in pruning:
        raise ValueError("token_pruning of the final scale cannot be combined with num_maskgit_iters > 1.")
    final_steps: List[Optional[torch.Tensor]] = [None]
    if num_maskgit_iters > 1:
        if maskgit_rng is None:
            seed = _on_generator_device(lambda d: torch.randint(0, 2**32 - 1, (1,), generator=generator, device=d),
                                        generator, "cpu")
            maskgit_rng = np.random.RandomState(int(seed))
        final_steps = maskgit_steps(maskgit_orders(B, last * last, maskgit_rng), num_maskgit_iters)

    contexts = torch.cat([context, negative_context])  # (2B, T, Ct)
    position_ids = torch.cat([context_position_ids, negative_position_ids]).to(context.device)
    kv_cache = transformer.new_kv_cache(2 * B, patch_nums, T, device=context.device)

    f_hat = torch.zeros(B, codebook.shape[1], last, last, device=device, dtype=codebook.dtype)
    scale_input = None  # (B, pn^2, Cv) input of the next scale (scale 0 reads the text condition)
    indices: List[torch.Tensor] = []
    residual_condition, residual_positions = None, None
    for si, pn in enumerate(patch_nums):
        ratio = min(si, num_scales - 2) / (num_scales - 1)
        guided_scale = si < stop
        if si == stop:  # guidance off from here on: drop the unconditional rows
            contexts, position_ids = contexts[:B], position_ids[:B]
            kv_cache.select_rows(B)
        halves = 2 if guided_scale else 1
        given = prefix[si].to(device) if si < len(prefix) else None
        keep = None if given is None or masks[si] is None else masks[si].to(device=device, dtype=torch.bool)
        kept_whole = given is not None and (keep is None or bool(keep.all()))
        is_final = si == num_scales - 1
        steps = final_steps if is_final else [None]
        if len(steps) > 1:  # MaskGIT: the groups are written into the scale's tokens
            idx = torch.empty(B, pn * pn, dtype=torch.long, device=device)
            tokens = codebook.new_empty(B, pn * pn, codebook.shape[1])
        if is_final:
            residual_condition = None
            residual_positions = [] if len(steps) > 1 or keep is not None else None  # None: all at once
        for positions in steps:  # one step, or the MaskGIT iterations of the final scale
            # every transformer computation is a forward call: offload hooks see it
            logits, h = transformer(contexts, position_ids, scale_input, patch_nums, return_dict=False,
                                    kv_cache=kv_cache, scale_index=si, positions=positions,
                                    token_pruning=pruning.get(pn, 0.0))
            step_given = None if given is None else _gather_rows(given, positions)
            if kept_whole:
                step_idx, step_tokens = step_given, codebook[step_given]
            else:
                t = ramp[si]
                guided = (1 + t) * logits[:B] - t * logits[B:] if guided_scale else logits
                k = default_top_k(si) if top_k is None else top_k
                step_idx, step_tokens = sample_scale_tokens(guided, codebook, k, top_p, smooth, ratio, generator)
                if step_given is not None:
                    step_keep = _gather_rows(keep, positions)
                    step_idx = torch.where(step_keep, step_given, step_idx)
                    step_tokens = torch.where(step_keep[..., None], codebook[step_given], step_tokens)
            if positions is None:
                idx, tokens = step_idx, step_tokens
            else:
                idx.scatter_(1, positions.to(device), step_idx)
                tokens.scatter_(1, positions.to(device)[..., None].expand_as(step_tokens), step_tokens)
            if is_final:
                (step_condition,) = transformer(None, position_ids, patch_nums=patch_nums, return_dict=False,
                                                kv_cache=kv_cache, residual_tokens=codebook[step_idx].repeat(halves, 1, 1))
                rows = None if positions is None else positions.to(device).repeat(2, 1)
                if not guided_scale:  # unguided residual stage: the conditional rows twice, guidance 0
                    step_condition = step_condition.repeat(2, 1, 1)
                if rows is None:
                    residual_condition = step_condition
                else:
                    if residual_condition is None:
                        residual_condition = step_condition.new_empty(2 * B, pn * pn, step_condition.shape[-1])
                    residual_condition.scatter_(1, rows[..., None].expand_as(step_condition), step_condition)
                if residual_positions is not None:  # positions kept by a mask keep their residual
                    sampled = torch.ones(B, pn * pn, dtype=torch.bool, device=device)
                    if positions is not None:
                        sampled = torch.zeros_like(sampled).scatter(1, positions.to(device), True)
                    residual_positions.append(sampled if keep is None else sampled & ~keep)
        indices.append(idx)
        tokens = tokens.transpose(1, 2).reshape(B, -1, pn, pn)
        f_hat = quantizer.add_scale(f_hat, tokens, si, patch_nums)
        if callback is not None:
            callback(si, num_scales, f_hat)
        if not is_final:
            scale_input = quantizer.next_scale_input(f_hat, patch_nums[si + 1])
    return HARTTokens(indices=indices, latent=f_hat, residual_condition=residual_condition,
                      residual_guidance=ramp[-1] if stop >= num_scales else 0.0, residual_positions=residual_positions)


def kept_scales(strength: float, num_scales: int) -> int:
    """Scales an edit keeps from the image: the last ``int(strength * SN)`` are re-sampled (diffusers' rule
    for img2img steps), so 0 keeps everything (the image's reconstruction) and 1 nothing (text-to-image)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"`strength` must be a number in [0, 1] (0 = the image itself, 1 = text-to-image); got {strength!r}.")
    return num_scales - min(int(strength * num_scales), num_scales)


def repaint_maps(mask: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """A pixel mask (B, 1, H, W) in [0, 1] (1 = repaint) -> per-scale boolean token maps (B, pn^2).

    The mask is area-resized to every scale's grid. A token is repainted when more than half of it is masked,
    and at the final scale when any of it is: every masked pixel is repainted, while coarse tokens half or
    more outside the mask stay the image's (later scales are residuals on top of them, so a re-sampled coarse
    token shifts the colours of the kept tokens it covers).
    """
    maps = []
    for si, pn in enumerate(patch_nums):
        coverage = F.interpolate(mask.float(), size=(pn, pn), mode="area").flatten(1)  # (B, pn^2)
        maps.append(coverage > 0 if si == len(patch_nums) - 1 else coverage > 0.5)
    return maps


def edit_tokens(
    transformer: HARTTransformer,
    tokenizer: HARTHybridTokenizer,
    image_tokens: HARTTokens,
    context: torch.Tensor,
    context_position_ids: torch.Tensor,
    strength: float = 1.0,
    repaint_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> HARTTokens:
    """The AR stage of an edit: the image's tokens teacher-forced where kept, sampled elsewhere.

    Args:
        image_tokens: the image's hybrid tokens (:func:`encode_images`), batch 1 or B; their schedule is used.
        strength: the last ``int(strength * SN)`` scales are re-sampled (see :func:`kept_scales`).
        repaint_mask: (B or 1, 1, H, W) pixel mask, 1 = repaint (inpainting); outside it every scale keeps
            the image's tokens. None = the whole image (variations / image-to-image).
        kwargs: the other arguments of :func:`generate_tokens` (guidance, generator, MaskGIT, ...).
    Returns:
        :class:`HARTTokens` whose ``residual`` is the image's; :func:`add_residual` re-samples it only where
        the final scale was sampled. When nothing is re-sampled these are the image's own tokens (nothing is
        computed; ``residual_positions`` is empty).
    """
    B = context.shape[0]
    indices = list(image_tokens.indices)
    patch_nums = tokenizer.patch_nums_from_indices(indices)
    if indices[0].shape[0] not in (1, B):
        raise ValueError(f"The image has batch {indices[0].shape[0]}; it must be 1 or the number of images ({B}).")
    indices = [idx.expand(B, -1) for idx in indices]
    residual = image_tokens.residual.expand(B, -1, -1, -1) if image_tokens.residual is not None else None
    num_kept = kept_scales(strength, len(patch_nums))
    if repaint_mask is None:
        masks = [None] * num_kept + [torch.zeros_like(idx, dtype=torch.bool) for idx in indices[num_kept:]]
    else:
        if repaint_mask.shape[0] not in (1, B):
            raise ValueError(f"The mask has batch {repaint_mask.shape[0]}; it must be 1 or the number of images ({B}).")
        repaint = repaint_maps(repaint_mask.expand(B, -1, -1, -1), patch_nums)
        masks = [None] * num_kept + [~r.to(idx.device) for r, idx in zip(repaint[num_kept:], indices[num_kept:])]
    if all(m is None or bool(m.all()) for m in masks):
        latent = tokenizer.quantizer.indices_to_latent(indices, patch_nums)
        return HARTTokens(indices=indices, latent=latent, residual=residual, residual_positions=[])
    tokens = generate_tokens(transformer, tokenizer, context, context_position_ids, patch_nums=patch_nums,
                             prefix_indices=indices, prefix_masks=masks, **kwargs)
    return HARTTokens(indices=tokens.indices, latent=tokens.latent, residual=residual,
                      residual_condition=tokens.residual_condition, residual_guidance=tokens.residual_guidance,
                      residual_positions=tokens.residual_positions)


def guided_head_output(head: HARTResidualHead, x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor,
                       guidance_scale: float) -> torch.Tensor:
    """Guided ``[eps | v]`` (N, 2 Cv) for noisy residuals x (N, Cv) under conditions (2N, C) [cond; uncond].

    The head runs on ``[x; x]``; eps is mixed as ``(1 + g) eps_c - g eps_u``; v stays the conditional one.
    """
    N, channels = x.shape
    if guidance_scale == 0:  # (1 + 0) eps_c - 0 eps_u = eps_c: the unconditional rows are not needed
        return head(x.to(head.dtype), timestep[:N], condition[:N].to(head.dtype)).float()
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
    """Fill in the continuous residual of AR-stage tokens.

    Guidance: ``guidance_scale`` if given, else the scheduler's configured ``guidance_scale``, else (official)
    the AR stage's final-scale guidance carried by ``tokens``.

    With ``tokens.residual_positions`` the groups are sampled one after the other (the official MaskGIT
    order of draws) and every other position keeps ``tokens.residual``. ``callback``: as in
    :func:`sample_residual`, step ``group * num_inference_steps + i``, with the residual as a map
    (B, Cv, h, w) in the head's units (a returned map replaces the group's positions).
    """
    if tokens.residual_positions == []:
        return tokens  # nothing to re-sample (an edit that kept every token)
    if tokens.residual_condition is None:
        raise ValueError("These tokens carry no residual condition; they must come from generate_tokens().")
    B, Cv, h, w = tokens.latent.shape
    guidance_scale = check_residual_guidance("guidance_scale", guidance_scale)
    g = next(v for v in (guidance_scale, scheduler.config.guidance_scale, tokens.residual_guidance) if v is not None)
    condition = tokens.residual_condition  # (2B, h*w, C)
    scale = head.config.residual_scale
    if tokens.residual_positions is None:  # every position at once (text-to-image): no gathering
        groups: List[Optional[torch.Tensor]] = [None]
        residual = tokens.latent.new_zeros(B, h * w, Cv)
    else:
        residual = (tokens.latent.new_zeros(B, h * w, Cv) if tokens.residual is None  # MaskGIT text-to-image
                    else tokens.residual.flatten(2).transpose(1, 2).clone())  # (B, h*w, Cv): kept where not sampled
        groups = [m.to(residual.device) for m in tokens.residual_positions if m.any()]
    for gi, group in enumerate(groups):
        # [cond; uncond] rows, row-major (b, position)
        rows = condition.flatten(0, 1) if group is None else torch.cat([condition[:B][group], condition[B:][group]])

        def on_step(i: int, t: int, x: torch.Tensor, gi: int = gi, group: Optional[torch.Tensor] = group):
            current = x.view(B, h * w, Cv) if group is None else (residual / scale).index_put((group,), x.to(residual.dtype))
            replaced = callback(gi * num_inference_steps + i, t, current.transpose(1, 2).reshape(B, Cv, h, w))
            if replaced is None:
                return None
            replaced = replaced.reshape(B, Cv, h * w).transpose(1, 2)
            return (replaced.reshape(-1, Cv) if group is None else replaced[group]).to(x.dtype)

        res = sample_residual(head, scheduler, rows, g, num_inference_steps, generator,
                              callback=None if callback is None else on_step)
        if group is None:
            residual = res.view(B, h * w, Cv).to(residual.dtype)
        else:
            residual[group] = res.to(residual.dtype)
    residual = residual.transpose(1, 2).reshape(B, Cv, h, w)
    return HARTTokens(indices=tokens.indices, latent=tokens.latent, residual=residual,
                      residual_condition=tokens.residual_condition, residual_guidance=g,
                      residual_positions=tokens.residual_positions)


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
    if not bool(torch.isfinite(latent).all()):
        raise ValueError("The tokens' latent holds NaN or infinite values (an edited latent or residual?); "
                         "decode finite tokens, e.g. from generate_tokens / add_residual or vae.encode.")
    return (tokenizer.decode_latent(latent) + 1) / 2
