"""Training losses of the HART components.

* :func:`tokenizer_loss` -- reconstruction (L1 + L2) + VQ (codebook + commitment) loss of the hybrid
  tokenizer over the multi-scale residual quantizer, straight-through estimator, and HART's
  *alternating decoder input*: each step the decoder sees, with probability ``continuous_prob``
  (0.5), the full continuous latent (discrete scales + continuous residual), otherwise the
  discrete-only latent (official ``skip_continuous_prob = 0.5``). The choice is returned.
* :func:`transformer_loss` -- the official ``HARTForT2I.forward`` training step: final-scale token
  dropping (dropped tokens leave the sequence), teacher-forced next-scale cross-entropy over the
  remaining tokens, and the residual diffusion loss (iDDPM: MSE on eps + VB term of the
  learned-range variance) on every kept final-scale token, with target and condition taken from
  the model's own sample of that scale; classifier-free-guidance condition dropout.
* :func:`diffusion_loss` -- the iDDPM loss itself, from :class:`HARTResidualScheduler` tables at
  1000 steps; :func:`normal_kl` / :func:`discretized_gaussian_log_likelihood` are its helpers.

Deviations from the official code (documented):
* CFG dropout draws ``rand(B) < cond_drop_prob`` (the official ``randn(B) < 0.1`` zeroes ~54% of the
  rows, not 10%), and dropped rows get all-zero text states **and** position ids 0, the convention
  the sampler uses for the unconditional branch (the official forward keeps their position ids);
* a top-k larger than the vocabulary keeps every token (the official ``topk`` raises and the
  forward falls back to the ground-truth indices);
* the quantizer follows the AR convention (no phi on the last scale), also during tokenizer
  training (the official ``HARTHybridQuantizer.forward`` applies phi to the last scale as well).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.residual_head import HARTResidualHead
from ..models.tokenizer import HARTHybridTokenizer
from ..models.transformer import HARTTransformer
from ..sampling import sample_scale_tokens


# ------------------------------------------------------------------------------------------------ tokenizer
@dataclass
class TokenizerLossOutput:
    loss: torch.Tensor  # total = recon + vq_weight * vq
    recon_loss: torch.Tensor  # l1_weight * L1 + l2_weight * L2 on the image
    vq_loss: torch.Tensor  # mean over scales of beta * commitment + codebook term
    used_continuous: bool  # True: the decoder saw f_hat + continuous residual; False: discrete only
    reconstruction: torch.Tensor  # (B, 3, H, W) decoder output (unclamped)
    indices: List[torch.Tensor]  # per-scale (B, pn^2) indices
    lookup_inputs: torch.Tensor  # (N, Cv) detached vectors that were quantised (for dead-code restarts)


def tokenizer_loss(
    tokenizer: HARTHybridTokenizer,
    images: torch.Tensor,
    patch_nums: Optional[Sequence[int]] = None,
    beta: float = 0.25,
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    vq_weight: float = 1.0,
    continuous_prob: float = 0.5,
    use_continuous: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
) -> TokenizerLossOutput:
    """Hybrid tokenizer training loss for images (B, 3, H, W) in [-1, 1].

    ``use_continuous`` forces the decoder input (None: random with probability ``continuous_prob``,
    drawn from ``generator`` / the global torch RNG).
    """
    patch_nums = tuple(patch_nums or tokenizer.config.patch_nums)
    quantizer = tokenizer.quantizer
    f = tokenizer.encode_latent(images)  # (B, Cv, h, w), with grad
    f_no_grad = f.detach().float()
    rest = f_no_grad.clone()
    f_hat = torch.zeros_like(rest)
    num_scales = len(patch_nums)
    vq = f.new_zeros(())
    indices, lookup_inputs = [], []
    for si, pn in enumerate(patch_nums):
        z = rest if si == num_scales - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        lookup_inputs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        idx = quantizer.lookup(z)  # (B, pn^2), no grad
        indices.append(idx)
        new_f_hat = quantizer.add_scale(f_hat, quantizer.embedding(idx), si, patch_nums)  # grad -> codebook, phi
        rest = rest - (new_f_hat - f_hat).detach()
        f_hat = new_f_hat
        vq = vq + beta * F.mse_loss(f_hat.detach(), f.float()) + F.mse_loss(f_hat, f_no_grad)
    vq = vq / num_scales
    if use_continuous is None:
        use_continuous = bool(torch.rand((), generator=generator) < continuous_prob)
    decoder_latent = (f_hat + rest) if use_continuous else f_hat  # rest = f - discrete part
    # straight-through: forward value = decoder_latent, gradient flows to the encoder as identity
    decoder_latent = (decoder_latent.detach() - f_no_grad) + f.float()
    recon = tokenizer.decoder(tokenizer.post_quant_conv(decoder_latent.to(f.dtype)))
    recon_loss = l1_weight * (recon - images).abs().mean() + l2_weight * F.mse_loss(recon, images)
    return TokenizerLossOutput(
        loss=recon_loss + vq_weight * vq,
        recon_loss=recon_loss,
        vq_loss=vq,
        used_continuous=use_continuous,
        reconstruction=recon,
        indices=indices,
        lookup_inputs=torch.cat(lookup_inputs).detach(),
    )


# ------------------------------------------------------------------------------------------------ diffusion
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats) of data in [-1, 1] discretised to 256 bins under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class DiffusionLossOutput:
    loss: torch.Tensor  # mean over rows of mse + vb
    mse: torch.Tensor
    vb: torch.Tensor


def diffusion_loss(
    head: HARTResidualHead,
    tables: Dict[str, torch.Tensor],
    x0: torch.Tensor,
    condition: torch.Tensor,
    timesteps: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> DiffusionLossOutput:
    """iDDPM loss (MSE on eps + VB of the learned-range variance) for clean rows x0 (N, Cv).

    ``tables``: :attr:`HARTResidualScheduler.tables` after ``set_timesteps(num_train_timesteps)``
    (float64, indexed by the training timestep). ``t ~ U{0, ..., T-1}`` unless given.
    """
    N, C = x0.shape
    T = tables["betas"].shape[0]
    device = x0.device
    x0 = x0.float()
    if timesteps is None:
        timesteps = torch.randint(0, T, (N,), generator=generator).to(device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(device)

    def gather(name: str) -> torch.Tensor:
        return tables[name].to(device)[timesteps].float()[:, None]

    abar = gather("alphas_cumprod")
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = head(x_t.to(head.dtype), timesteps, condition.to(head.dtype)).float()
    eps, v = out[:, :C], out[:, C:]
    mse = (noise - eps).pow(2).mean(dim=1)

    # VB term: the mean uses a frozen eps so that it only trains the variance (iDDPM)
    frac = (v + 1) / 2
    model_log_var = frac * gather("log_betas") + (1 - frac) * gather("posterior_log_variance_clipped")
    pred_x0 = gather("sqrt_recip_alphas_cumprod") * x_t - gather("sqrt_recipm1_alphas_cumprod") * eps.detach()
    coef1, coef2 = gather("posterior_mean_coef1"), gather("posterior_mean_coef2")
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    true_log_var = gather("posterior_log_variance_clipped")
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=1) / math.log(2.0)
    vb = torch.where(timesteps == 0, nll, kl)
    return DiffusionLossOutput(loss=(mse + vb).mean(), mse=mse.mean(), vb=vb.mean())


# ------------------------------------------------------------------------------------------------ transformer
def sample_kept_positions(batch_size: int, num_tokens: int, mask_ratio_min: float = 0.5, min_kept: int = 32,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """HART's (MAR's) final-scale token dropping: which of ``num_tokens`` positions stay in the training pass.

    One mask rate per batch ~ a normal (mean 1, std 0.25) truncated to [``mask_ratio_min``, 1];
    ``ceil(num_tokens * rate)`` positions are dropped, but at least ``min_kept`` stay (so a final
    scale of <= 32 tokens keeps all). The dropped set is a random permutation's head, per row.
    Draws, in order, from ``generator``: the rate (one uniform), the orders (B, num_tokens uniforms).
    Returns (B, k) int64 kept positions, ascending.
    """
    low = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / 0.25, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    rate = 1.0 + 0.25 * torch.special.ndtri(low + u * (0.5 - low)).item()  # inverse CDF on [low, 0.5]
    num_drop = max(0, min(math.ceil(num_tokens * rate), num_tokens - min_kept))
    orders = torch.rand(batch_size, num_tokens, generator=generator).argsort(dim=1)
    return orders[:, num_drop:].sort(dim=1).values


@dataclass
class TransformerTrainingDraws:
    """The random choices of one transformer training step. Any field left None is drawn; tests give them
    all to replay the numbers recorded from the official code."""

    dropped: Optional[torch.Tensor] = None  # (B,) bool: rows whose text condition is zeroed (CFG dropout)
    kept_positions: Optional[torch.Tensor] = None  # (B, k) ascending final-scale positions kept in the pass
    sampled: Optional[torch.Tensor] = None  # (B, k) the model's own sample of the kept final-scale tokens
    timesteps: Optional[torch.Tensor] = None  # (k * B * diffusion_batch_mul,) diffusion timesteps
    noise: Optional[torch.Tensor] = None  # (k * B * diffusion_batch_mul, Cv) diffusion noise


@dataclass
class TransformerLossOutput:
    loss: torch.Tensor  # ce_loss + diffusion_weight * diffusion_loss
    ce_loss: torch.Tensor  # over every token left in the pass
    diffusion_loss: torch.Tensor
    diffusion_mse: torch.Tensor
    diffusion_vb: torch.Tensor
    accuracy: torch.Tensor  # top-1 token accuracy over the tokens left in the pass
    num_kept: int  # final-scale tokens per image left in the pass (each supervises the residual head)
    logits: torch.Tensor  # (B, sum_{si < SN-1} pn^2 + k, V)
    draws: TransformerTrainingDraws  # every random choice made, filled in


def scale_token_weights(scale_loss_weights: Sequence[float], patch_nums: Sequence[int], num_kept: int) -> torch.Tensor:
    """Per-token CE weights (L',) of a training sequence: scale ``s``'s weight on each of its ``pn_s^2`` tokens,
    the final scale's on its ``num_kept`` kept tokens.

    Why: with uniform weights the coarse scales, where a two-object scene's arrangement and colour binding
    are decided (1x1 and 2x2: 5 of 130 tokens), get ~4% of the CE gradient. Weighting scales rather than
    tokens follows Infinity's ``reweight_loss_by_scale``; HART and VAR train with uniform weights.
    """
    weights = [float(w) for w in scale_loss_weights]
    if len(weights) != len(patch_nums) or any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise ValueError(f"scale_loss_weights={list(scale_loss_weights)} must give one finite weight >= 0 per scale "
                         f"(patch_nums {tuple(patch_nums)}: {len(patch_nums)} weights), not all zero; e.g. "
                         f"{[1.0] * len(patch_nums)} is the official uniform loss.")
    counts = [pn * pn for pn in patch_nums[:-1]] + [num_kept]
    return torch.cat([torch.full((n,), w) for n, w in zip(counts, weights)])


def transformer_loss(
    transformer: HARTTransformer,
    head: HARTResidualHead,
    tokenizer: HARTHybridTokenizer,
    tables: Dict[str, torch.Tensor],
    context: torch.Tensor,
    context_position_ids: torch.Tensor,
    indices: Sequence[torch.Tensor],
    residual: torch.Tensor,
    patch_nums: Optional[Sequence[int]] = None,
    token_dropping: bool = True,
    mask_ratio_min: float = 0.5,
    min_kept: int = 32,
    cond_drop_prob: float = 0.1,
    diffusion_batch_mul: int = 4,
    diffusion_weight: float = 1.0,
    top_k: int = 600,
    top_p: float = 0.96,
    scale_loss_weights: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    draws: Optional[TransformerTrainingDraws] = None,
) -> TransformerLossOutput:
    """The official ``HARTForT2I.forward`` training step: CE over the kept tokens + residual diffusion loss.

    1. Final-scale token dropping (:func:`sample_kept_positions`): dropped tokens leave the sequence.
    2. One teacher-forced, block-causal pass; CE of every remaining token against its ground truth.
    3. The model samples its own kept final-scale tokens from its logits (``top_k`` 600, ``top_p``
       0.96, no gradient); the residual head learns, on every kept token x ``diffusion_batch_mul``,
       the residual from that sample to the continuous latent, ``(latent - codebook[sample]) /
       residual_scale``, conditioned on ``decoder_norm(h + word_embed(codebook[sample]))``.

    Args:
        context, context_position_ids: (B, T, Ct) text states, (B, T) int64 position ids.
        indices: ground-truth per-scale indices (B, pn^2) from ``tokenizer.encode``.
        residual: (B, Cv, h, w) ground-truth continuous residual from ``tokenizer.encode`` (latent minus
            its discrete part).
        token_dropping: False keeps every final-scale token in the pass (slower; same losses otherwise).
        cond_drop_prob: probability of zeroing a row's text condition (and its position ids).
        scale_loss_weights: one weight per scale for its tokens' CE (None: every token alike, the official
            loss). The training loss is then the weighted mean CE; ``ce_loss`` stays the plain mean CE, so
            runs with and without weights log comparable numbers (see :func:`scale_token_weights`).
        generator: source of every draw, in order: CFG dropout (B uniforms), the mask rate and
            orders, the multinomial of the own sample, the diffusion timesteps and noise.
        draws: given draws are used instead of drawing (see :class:`TransformerTrainingDraws`).
    """
    patch_nums = tuple(patch_nums or transformer.config.patch_nums)
    draws = TransformerTrainingDraws(**vars(draws)) if draws is not None else TransformerTrainingDraws()
    B = context.shape[0]
    device = transformer.device
    num_last = patch_nums[-1] ** 2
    if draws.dropped is None:
        draws.dropped = torch.rand(B, generator=generator) < cond_drop_prob
    dropped = draws.dropped.to(device)
    context = context.to(device) * (~dropped)[:, None, None].to(context.dtype)
    position_ids = context_position_ids.to(device).masked_fill(dropped[:, None], 0)
    if draws.kept_positions is None:
        draws.kept_positions = (sample_kept_positions(B, num_last, mask_ratio_min, min_kept, generator) if token_dropping
                                else torch.arange(num_last).expand(B, -1))
    kept = draws.kept_positions.to(device)
    indices = [idx.to(device) for idx in indices]
    quantizer = tokenizer.quantizer
    with torch.no_grad():
        scale_inputs = quantizer.teacher_forcing_input(indices, patch_nums)
        codebook = quantizer.embedding.weight.detach()

    dropping = kept.shape[1] < num_last
    out = transformer(context, position_ids, scale_inputs, patch_nums, kept_positions=kept if dropping else None)
    targets = torch.cat(list(indices[:-1]) + [indices[-1].gather(1, kept)], dim=1)  # (B, L')
    per_token = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), reduction="none").view(B, -1)
    ce = per_token.mean()
    ce_objective = ce
    if scale_loss_weights is not None:
        weights = scale_token_weights(scale_loss_weights, patch_nums, kept.shape[1]).to(device)  # (L',)
        ce_objective = (per_token * weights).sum() / (weights.sum() * B)
    accuracy = (out.logits.argmax(-1) == targets).float().mean()

    num_kept = kept.shape[1]
    last_logits = out.logits[:, -num_kept:].detach()  # (B, k, V)
    if draws.sampled is None:
        with torch.no_grad():
            draws.sampled, _ = sample_scale_tokens(last_logits.float(), codebook, top_k, top_p, False, 0.0, generator)
    sampled = draws.sampled.to(device)
    sampled_codes = codebook[sampled]  # (B, k, Cv)
    res_tokens = residual.to(device).flatten(2).transpose(1, 2)  # (B, h*w, Cv)
    latent = res_tokens.gather(1, kept[..., None].expand(-1, -1, res_tokens.shape[-1])) + codebook[indices[-1].gather(1, kept)]
    x0 = ((latent - sampled_codes) / head.config.residual_scale).flatten(0, 1).repeat(diffusion_batch_mul, 1)
    condition = transformer.residual_condition(out.hidden_states[:, -num_kept:], sampled_codes)  # (B, k, C)
    condition = condition.flatten(0, 1).repeat(diffusion_batch_mul, 1)
    if draws.timesteps is None:
        draws.timesteps = torch.randint(0, tables["betas"].shape[0], (x0.shape[0],), generator=generator)
    if draws.noise is None:
        draws.noise = torch.randn(x0.shape, generator=generator)
    diff = diffusion_loss(head, tables, x0, condition, timesteps=draws.timesteps.to(device), noise=draws.noise.to(device))
    return TransformerLossOutput(
        loss=ce_objective + diffusion_weight * diff.loss,
        ce_loss=ce,
        diffusion_loss=diff.loss,
        diffusion_mse=diff.mse,
        diffusion_vb=diff.vb,
        accuracy=accuracy,
        num_kept=num_kept,
        logits=out.logits,
        draws=draws,
    )


__all__ = [
    "DiffusionLossOutput",
    "TokenizerLossOutput",
    "TransformerLossOutput",
    "TransformerTrainingDraws",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "sample_kept_positions",
    "scale_token_weights",
    "tokenizer_loss",
    "transformer_loss",
]
