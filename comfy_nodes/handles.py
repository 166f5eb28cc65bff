"""The objects that travel on the custom sockets: HART_MODEL, HART_CONDITIONING and HART_TOKENS."""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from hart_pipeline import HARTPipeline, HARTTokens
from hart_pipeline.preview import preview_images

from . import runtime

HART_MODEL = "HART_MODEL"
HART_CONDITIONING = "HART_CONDITIONING"
HART_TOKENS = "HART_TOKENS"


@dataclass
class HARTModel:
    """HART_MODEL: a loaded :class:`HARTPipeline` and where its stages run.

    Every stage loads only the components it needs to ``device``; with ``offload`` it puts them back on
    ``offload_device`` (ComfyUI's ``unet_offload_device``) right after the stage.
    """

    pipe: HARTPipeline
    name: str
    device: torch.device
    offload_device: torch.device
    dtype: torch.dtype
    offload: bool = False
    # LoRA adapters active for this handle: (adapter name, weight). Handles made by HART LoRA Loader share the
    # pipeline of the loader's handle, so every stage activates its own handle's set (none = LoRA off).
    adapters: Tuple[Tuple[str, float], ...] = ()

    patchers: Dict[str, Any] = field(default_factory=dict, repr=False)

    def patcher(self, component: str):
        """The component's ComfyUI ``ModelPatcher`` (made once), or None outside ComfyUI."""
        if component not in self.patchers:
            module = getattr(self.pipe, component)
            self.patchers[component] = runtime.model_patcher(module, self.device, self.offload_device)
        return self.patchers[component]

    @contextlib.contextmanager
    def stage(self, *components: str):
        """Put ``components`` on ``device`` for one stage.

        Inside ComfyUI they go through its model management (``load_models_gpu``), which evicts other
        models to make room and evicts these when others need it; elsewhere they are moved directly.
        """
        names = [c for c in components if getattr(self.pipe, c, None) is not None]
        patchers = [self.patcher(c) for c in names]
        if patchers and all(p is not None for p in patchers):
            runtime.load_patchers(patchers)
        else:
            patchers = []
            for c in names:
                getattr(self.pipe, c).to(self.device)
        self.activate_adapters()
        try:
            yield self.pipe
        finally:
            if self.offload and self.offload_device != self.device:
                if patchers:
                    runtime.unload_patchers(patchers)
                else:
                    for c in names:
                        getattr(self.pipe, c).to(self.offload_device)
                    runtime.soft_empty_cache()

    def activate_adapters(self) -> None:
        """Make exactly this handle's LoRA adapters active on the shared pipeline (all off for a plain handle)."""
        if not any(self.pipe.get_list_adapters().values()):
            return
        if self.adapters:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in self.adapters], [weight for _, weight in self.adapters])
        else:
            self.pipe.disable_lora()

    def preview(self, latent: torch.Tensor) -> torch.Tensor:
        """A low-resolution decode (1, 3, h, w) in [0, 1] of the first image's running latent (the one ComfyUI
        shows), wherever the tokenizer is."""
        return preview_images(self.pipe.vae, latent[:1])

    def __repr__(self) -> str:  # shown by ComfyUI in error messages
        return f"HARTModel({self.name!r}, device={self.device}, dtype={self.dtype})"


@dataclass
class HARTConditioning:
    """HART_CONDITIONING: text hidden states for the AR stage.

    ``embeds`` (B, T, Ct) float32, ``position_ids`` (B, T) int64 (``cumsum(mask) - 1``, pads repeat the
    last id, as ``HARTPipeline.encode_prompt`` returns them) and ``attention_mask`` (B, T) recovered from
    them. ``embeds is None`` is the official unconditional branch: an all-zero condition with position
    ids 0 shaped like the positive one (what ``generate_tokens`` does with no negative).
    """

    embeds: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor] = None
    prompt: Optional[str] = None

    @property
    def is_empty(self) -> bool:
        return self.embeds is None

    @staticmethod
    def mask_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
        """A token is real where its position id moved on (pads repeat the previous id)."""
        first = position_ids[:, :1] == 0
        return torch.cat([first, position_ids[:, 1:] != position_ids[:, :-1]], dim=1).long()

    def rows(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(embeds, position_ids) with every prompt repeated ``batch_size`` times (``num_images_per_prompt``)."""
        return (self.embeds.repeat_interleave(batch_size, 0), self.position_ids.repeat_interleave(batch_size, 0))


@dataclass
class HARTTokenHandle:
    """HART_TOKENS: hybrid tokens plus what the next stage needs to continue exactly like the pipeline.

    Attributes:
        tokens: :class:`hart_pipeline.HARTTokens` (per-scale ``indices``, discrete ``latent``, ``residual``
            or None, the residual head's ``residual_condition`` and ``residual_guidance``).
        patch_nums: the token-map sides, coarse to fine.
        generator_state: the CPU ``torch.Generator`` state right after the AR stage. ``HARTPipeline``
            draws the AR stage and then the residual stage from ONE generator; the Residual Diffusion
            node with ``seed = -1`` restores this state, so the chain gives the pipeline's image for
            the same seed. None for tokens from the tokenizer's encoder.
        seed: the AR stage's seed (informational).
    """

    tokens: HARTTokens
    patch_nums: Tuple[int, ...]
    generator_state: Optional[torch.Tensor] = field(default=None, repr=False)
    seed: Optional[int] = None

    @property
    def batch_size(self) -> int:
        return self.tokens.indices[0].shape[0]
