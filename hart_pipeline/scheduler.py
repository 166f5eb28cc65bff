"""The residual diffusion sampler: iDDPM with a cosine schedule, learned-range variance and respacing.

HART samples the continuous residual in 8 steps by respacing the 1000-step cosine schedule (the
official ``SpacedDiffusion(space_timesteps(1000, "8"))``): the kept timesteps are
``round(i * 999 / 7)`` and every coefficient is recomputed from the respaced betas in float64.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .validation import boolean, check_config, check_int, check_residual_guidance

CONFIG_RULES = {
    "num_train_timesteps": lambda name, value: check_int(name, value, 2, 100_000), "clip_sample": boolean,
    "guidance_scale": check_residual_guidance,
}


@dataclass
class HARTResidualSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample: (N, Cv) the sample at the previous (less noisy) kept timestep.
        pred_original_sample: (N, Cv) the clipped prediction of the clean residual.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2``, float64."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def respaced_timesteps(num_train_timesteps: int, num_inference_steps: int) -> np.ndarray:
    """The kept timesteps, ascending: ``round(i * (T - 1) / (n - 1))`` (iDDPM ``space_timesteps(T, "n")``)."""
    stride = (num_train_timesteps - 1) / (num_inference_steps - 1)
    steps, position = [], 0.0
    for _ in range(num_inference_steps):
        steps.append(round(position))
        position += stride
    return np.array(sorted(set(steps)))


class HARTResidualScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral iDDPM sampler of HART's residual diffusion head.

    The model predicts ``[eps | v]`` (N, 2 Cv); ``v`` in [-1, 1] interpolates the log-variance between
    the clipped posterior variance and beta ("learned range"). Classifier-free guidance is mixed into
    ``eps`` by the caller before :meth:`step` (:func:`hart_pipeline.sampling.sample_residual`).

    Args:
        num_train_timesteps: length of the training schedule.
        clip_sample: clip the predicted clean residual to [-1, 1].
        guidance_scale: the residual stage's default guidance for the head it ships with, in HART's
            convention ``(1 + g) eps_c - g eps_u`` (0 = the conditional prediction alone). None (official):
            the AR stage's final-scale guidance. A call's ``residual_guidance_scale`` overrides it. The
            built-in 64 px model sets 0: its small head's residuals overshoot under strong guidance (model card).
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, clip_sample: bool = True, guidance_scale: Optional[float] = None):
        check_config("HARTResidualScheduler", locals(), CONFIG_RULES)
        self.train_betas = cosine_betas(num_train_timesteps)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - self.train_betas))
        self.init_noise_sigma = 1.0
        self.num_inference_steps: Optional[int] = None
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Respace the schedule to ``num_inference_steps`` and recompute every coefficient (float64)."""
        if num_inference_steps < 2 or num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be between 2 and {self.config.num_train_timesteps}; got {num_inference_steps}."
            )
        kept = respaced_timesteps(self.config.num_train_timesteps, num_inference_steps)
        kept_abar = self.alphas_cumprod.numpy()[kept]
        betas = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
        abar = np.cumprod(1.0 - betas)  # recomputed from the respaced betas, as the official code does
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # the posterior variance is 0 at the first step: its log is clipped to the next one
        clipped = np.append(posterior_variance[1], posterior_variance[1:])
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "log_betas": np.log(betas),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(clipped),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
        }
        self.tables = {name: torch.from_numpy(values) for name, values in tables.items()}
        self.timestep_map = torch.from_numpy(kept)
        self.timesteps = self.timestep_map.flip(0).to(device)
        self.num_inference_steps = len(kept)

    def _index(self, timestep: Union[int, torch.Tensor]) -> int:
        t = int(timestep)
        matches = (self.timestep_map == t).nonzero()
        if len(matches) == 0:
            raise ValueError(f"Timestep {t} is not one of the scheduler's timesteps {self.timesteps.tolist()}.")
        return int(matches[0, 0])

    def _coefficient(self, name: str, index: int, like: torch.Tensor) -> torch.Tensor:
        # gathered in float64, then cast to fp32 as the official sampler does
        return self.tables[name][index].float().to(like.device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
        noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[HARTResidualSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One ancestral step from ``timestep`` to the previous kept timestep.

        Args:
            model_output: (N, 2 Cv) ``[eps | v]`` (eps already guidance-mixed).
            sample: (N, Cv) current noisy residual.
            generator: draws the step noise, also at the last step where it is multiplied by zero (so
                the random stream advances exactly as in the official sampler).
            noise: optional pre-drawn noise (N, Cv), instead of drawing from ``generator``.
        """
        j = self._index(timestep)
        channels = sample.shape[-1]
        eps, v = model_output[..., :channels].float(), model_output[..., channels:].float()
        x = sample.float()
        x0 = self._coefficient("sqrt_recip_alphas_cumprod", j, x) * x - self._coefficient("sqrt_recipm1_alphas_cumprod", j, x) * eps
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        mean = self._coefficient("posterior_mean_coef1", j, x) * x0 + self._coefficient("posterior_mean_coef2", j, x) * x
        frac = (v + 1) / 2
        log_variance = frac * self._coefficient("log_betas", j, x) + (1 - frac) * self._coefficient("posterior_log_variance_clipped", j, x)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                                dtype=x.dtype).to(x.device)
        prev = mean + float(j != 0) * torch.exp(0.5 * log_variance) * noise * temperature
        prev = prev.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return HARTResidualSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process on the training schedule: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        abar = self.alphas_cumprod.to(original_samples.device)[timesteps].float()[:, None]
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


__all__ = ["HARTResidualScheduler", "HARTResidualSchedulerOutput"]
