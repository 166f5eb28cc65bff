"""HART's residual diffusion head: a 37M AdaLN MLP that denoises the continuous residual token by token.

The head predicts, for every final-scale position, the residual between the continuous latent and
its discrete approximation, conditioned on the transformer's last hidden state there (see
:meth:`HARTTransformer.residual_condition`). It outputs ``[eps | v]``: the noise prediction and the
learned-range variance interpolation (iDDPM), in units of ``residual_scale``.
State-dict keys follow the official ``diffloss.net.*`` weights.
"""

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

from ..loading import StrictLoadingMixin
from ..validation import check_config, positive_int, positive_real
from .layers import TimestepEmbedding, modulate

CONFIG_RULES = {
    "latent_channels": positive_int(4096), "condition_dim": positive_int(1 << 16), "width": positive_int(1 << 16),
    "num_layers": positive_int(1024), "residual_scale": positive_real(),
}


class ResidualBlock(nn.Module):
    """``x + gate * MLP(modulate(LayerNorm(x), shift, scale))`` with (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class HARTResidualHead(StrictLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""The residual diffusion MLP (MAR's ``SimpleMLPAdaLN``).

    Args:
        latent_channels: channels of one residual token (``Cvae``); the output has twice as many.
        condition_dim: width of the condition (the transformer's ``embed_dim``).
        width: hidden width of the MLP.
        num_layers: number of AdaLN residual blocks.
        residual_scale: the residual is modelled divided by this factor (official ``vae_scale``).
    """

    _config_rules = CONFIG_RULES
    _no_split_modules = ["ResidualBlock"]
    _repeated_blocks = ["ResidualBlock"]
    # layerwise casting stores the residual blocks in a low dtype; the embeddings and the output layer
    # (eps and the variance interpolation the scheduler reads) keep the compute dtype
    _skip_layerwise_casting_patterns = ["time_embed", "cond_embed", "input_proj", "final_layer", "norm"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, latent_channels: int = 32, condition_dim: int = 1536, width: int = 1024, num_layers: int = 6,
                 residual_scale: float = 0.6):
        super().__init__()
        check_config("HARTResidualHead", locals(), CONFIG_RULES)
        self.time_embed = TimestepEmbedding(width)
        self.cond_embed = nn.Linear(condition_dim, width)
        self.input_proj = nn.Linear(latent_channels, width)
        self.res_blocks = nn.ModuleList(ResidualBlock(width) for _ in range(num_layers))
        self.final_layer = FinalLayer(width, 2 * latent_channels)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """sample (N, Cv), timestep (N,) on the 1000-step training scale, condition (N, C) -> (N, 2 Cv)."""
        x = self.input_proj(sample)
        y = self.time_embed(timestep) + self.cond_embed(condition)
        for block in self.res_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, y)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


__all__ = ["HARTResidualHead"]
