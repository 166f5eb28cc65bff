"""``HARTPipeline``: text-to-image with HART in diffusers.

Stages: text encoding (``encode_prompt``) -> next-scale AR prediction of the discrete tokens
(``transformer``) -> residual diffusion of the continuous detail (``residual_head`` + ``scheduler``)
-> decoding (``vae``, the hybrid tokenizer).
"""

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from huggingface_hub import create_repo

from .hub import write_model_card
from .models.residual_head import HARTResidualHead
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .sampling import HARTTokens, add_residual, decode_tokens, generate_tokens
from .scheduler import HARTResidualScheduler
from .schedules import supported_sizes

# The official HART system prompt (hart/utils/constants.py); the released model saw it before every prompt.
SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation.\n\nExamples:\n- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a "
    "round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a "
    "diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers."
    "\n\nPlease generate only the enhanced description for the prompt below and DO NOT include any additional "
    'sentences. Start your response with "Enhanced Prompt:".\n\nUser Prompt:\n'
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from hart_pipeline import HARTPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-0.7b-1024px-diffusers", torch_dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a lemur in a magician hat", generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.save("lemur.png")
        ```
"""


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """HART's text position ids ``cumsum(mask) - 1``: right padding repeats the last valid id."""
    return mask.long().cumsum(1) - 1


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: List[str], max_length: int,
                system_prompt: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official ``encode_prompts``: fp32 hidden states (B, max_length, C) and the mask (B, max_length).

    Each prompt is padded to ``max_length`` separately; with a ``system_prompt`` the text model reads
    ``[system, prompt]`` and only the prompt positions are kept. Every position (pads included) is
    returned: HART attends to all of them.
    """
    ids = torch.stack([
        tokenizer(p, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids[0]
        for p in prompts
    ])
    mask = (ids != tokenizer.pad_token_id).long()
    device = text_encoder.device
    if system_prompt is None:
        return text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float(), mask
    system = tokenizer(system_prompt, max_length=max_length, truncation=True, return_tensors="pt").input_ids
    system = system.repeat(len(prompts), 1)
    hidden = text_encoder(
        input_ids=torch.cat([system, ids], 1).to(device),
        attention_mask=torch.cat([torch.ones_like(system), mask], 1).to(device),
    ).last_hidden_state[:, system.shape[1]:]
    return hidden.float(), mask


@dataclass
class HARTPipelineOutput(BaseOutput):
    """
    Args:
        images: PIL images, a numpy array (B, H, W, 3) or a tensor (B, 3, H, W) in [0, 1]; with
            ``output_type="latent"`` the :class:`~hart_pipeline.sampling.HARTTokens` themselves.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor, HARTTokens]


class HARTPipeline(DiffusionPipeline):
    r"""Text-to-image generation with HART (Hybrid Autoregressive Transformer, arXiv 2410.10812).

    Args:
        tokenizer: text tokenizer of ``text_encoder``.
        text_encoder: a transformers text model whose ``last_hidden_state`` conditions the transformer
            (Qwen2 for the released model; any encoder of the transformer's ``context_dim`` works).
        vae: the hybrid tokenizer (discrete multi-scale tokens + continuous residual).
        transformer: the AR transformer.
        residual_head: the residual diffusion MLP.
        scheduler: the residual diffusion sampler.
        use_system_prompt: encode prompts after the official HART system prompt (the released model
            was trained that way; models trained with another text encoder usually are not).
    """

    model_cpu_offload_seq = "text_encoder->transformer->residual_head->vae"
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae: HARTHybridTokenizer,
        transformer: HARTTransformer,
        residual_head: HARTResidualHead,
        scheduler: HARTResidualScheduler,
        use_system_prompt: bool = True,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              residual_head=residual_head, scheduler=scheduler)
        self.register_to_config(use_system_prompt=use_system_prompt)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae.downsample_factor if vae is not None else 16)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "HARTPipeline":
        """Load a HART pipeline folder or Hub repo (see ``DiffusionPipeline.from_pretrained``).

        A local folder in the official layout (``llm/`` + ``tokenizer/``) or any other non-HART folder
        gives a ValueError that says how to get a loadable one.
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            index = os.path.join(path, "model_index.json")
            if not os.path.isfile(index):
                if os.path.isdir(os.path.join(path, "llm")) or os.path.isfile(os.path.join(path, "ema_model.bin")):
                    raise ValueError(
                        f"{path} is an official HART checkpoint, not a diffusers folder; convert it first: "
                        f"`hart convert {path} <output folder>` (or load it in memory with "
                        "hart_pipeline.convert.convert_official)."
                    )
                raise ValueError(f"{path} is not a HART pipeline folder: it has no model_index.json.")
            with open(index) as f:
                class_name = json.load(f).get("_class_name")
            if class_name != cls.__name__:
                raise ValueError(f"{path} holds a {class_name} pipeline, not a {cls.__name__}.")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, variant: Optional[str] = None,
                        push_to_hub: bool = False, **kwargs) -> None:
        """Save every component (safetensors), ``model_index.json`` and a model card (README.md, kept if present).

        With ``push_to_hub=True`` the folder is then uploaded to ``repo_id`` (default: the folder name),
        like diffusers pipelines, but with HART's model card.
        """
        hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        repo_id = hub.get("repo_id") or os.path.basename(os.path.abspath(save_directory))
        if not os.path.isfile(os.path.join(save_directory, "README.md")):
            write_model_card(save_directory, title=f"HART text-to-image ({repo_id})",
                             description="A HART pipeline saved with `HARTPipeline.save_pretrained`.",
                             repo_id=repo_id, size=self.default_size)
        if push_to_hub:
            repo_id = create_repo(repo_id, private=hub.get("private"), token=hub.get("token"), exist_ok=True).repo_id
            self._upload_folder(save_directory, repo_id, token=hub.get("token"), commit_message=hub.get("commit_message"),
                                create_pr=hub.get("create_pr", False))

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: Optional[str] = None, **kwargs) -> str:
        """Upload the pipeline (components, ``model_index.json``, HART model card) to the Hub repo ``repo_id``."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant, repo_id=repo_id)
            return self._upload_folder(tmp, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def supported_sizes(self) -> Dict[int, Tuple[int, ...]]:
        """Square image side -> patch schedule: the model's own schedule and the standard ones."""
        return supported_sizes(self.transformer.config.patch_nums, self.vae.downsample_factor)

    def patch_nums_for_size(self, height: int, width: int) -> Tuple[int, ...]:
        sizes = self.supported_sizes
        if height != width or height not in sizes:
            valid = ", ".join(f"{s}x{s}" for s in sorted(sizes))
            raise ValueError(f"HART generates square images of {valid}; got height={height}, width={width}.")
        return sizes[height]

    @property
    def default_size(self) -> int:
        return self.transformer.config.patch_nums[-1] * self.vae.downsample_factor

    # ------------------------------------------------------------------------------------------------ text
    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: int = 1,
        device: Optional[torch.device] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        max_sequence_length: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Encode prompts to HART's text condition.

        Returns ``(prompt_embeds, prompt_position_ids, negative_prompt_embeds, negative_position_ids)``:
        fp32 hidden states (B * num_images_per_prompt, T, Ct) and int64 position ids
        ``cumsum(mask) - 1`` (pads repeat the last id, as the official code). The negative pair is None
        when neither ``negative_prompt`` nor ``negative_prompt_embeds`` is given: the official
        unconditional branch is then an all-zero condition.
        """
        device = device or self._execution_device
        max_length = max_sequence_length or self.transformer.config.context_tokens
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self._encode_text(prompt, max_length, device)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        if negative_prompt_embeds is None and negative_prompt is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negative_prompt, max_length, device)
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long,
                                                        device=negative_prompt_embeds.device)

        def expand(embeds: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            positions = position_ids_from_mask(mask)
            return (embeds.float().to(device).repeat_interleave(num_images_per_prompt, 0),
                    positions.to(device).repeat_interleave(num_images_per_prompt, 0))

        prompt_embeds, prompt_position_ids = expand(prompt_embeds, prompt_attention_mask)
        if negative_prompt_embeds is None:
            return prompt_embeds, prompt_position_ids, None, None
        return (prompt_embeds, prompt_position_ids) + expand(negative_prompt_embeds, negative_prompt_attention_mask)

    def _encode_text(self, prompt: Union[str, List[str]], max_length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "This pipeline has no text encoder: pass `prompt_embeds` (and `prompt_attention_mask`), or load "
                "one with HARTPipeline.from_pretrained(..., text_encoder=..., tokenizer=...)."
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        hidden, mask = encode_text(self.tokenizer, self.text_encoder, prompts, max_length,
                                   SYSTEM_PROMPT if self.config.use_system_prompt else None)
        return hidden, mask.to(device)

    # ------------------------------------------------------------------------------------------------ checks
    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, top_k, top_p,
                     num_images_per_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                     output_type, callback_on_step_end_tensor_inputs) -> None:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` or `prompt_embeds`.")
        if prompt is not None:
            if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
                raise ValueError(f"`prompt` must be a string or a list of strings; got {type(prompt).__name__}.")
            if isinstance(prompt, list) and len(prompt) == 0:
                raise ValueError("`prompt` is an empty list: pass at least one prompt.")
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` or `negative_prompt_embeds`.")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch} prompts; pass one negative "
                "prompt per prompt, or a single string for all."
            )
        context_dim = self.transformer.config.context_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if embeds.ndim != 3 or embeds.shape[-1] != context_dim:
                raise ValueError(
                    f"`{name}` must be (batch, tokens, {context_dim}) for this transformer (context_dim={context_dim}); "
                    f"got {tuple(embeds.shape)}. Encode with the text encoder the model was trained with."
                )
            if embeds.shape[0] != batch:
                raise ValueError(f"`{name}` has batch {embeds.shape[0]} but there are {batch} prompts.")
        if prompt_attention_mask is not None and prompt_embeds is not None and prompt_attention_mask.shape != prompt_embeds.shape[:2]:
            raise ValueError(f"`prompt_attention_mask` must be {tuple(prompt_embeds.shape[:2])}; got {tuple(prompt_attention_mask.shape)}.")
        self.patch_nums_for_size(height, width)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
            raise ValueError(f"`num_inference_steps` (residual diffusion steps) must be an integer >= 2; got {num_inference_steps}.")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0 (0 disables guidance); got {guidance_scale}.")
        if top_k is not None and top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it, None = the official 600/300 schedule); got {top_k}.")
        if not 0 <= top_p < 1:
            raise ValueError(f"`top_p` must be in [0, 1) (0 disables it); got {top_p}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1; got {num_images_per_prompt}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs {sorted(unknown)} are not among {self._callback_tensor_inputs}.")

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 8,
        guidance_scale: float = 4.5,
        top_k: Optional[int] = None,
        top_p: float = 0.0,
        smooth: bool = True,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["HARTPipeline", int, int, Dict[str, Any]], Dict[str, Any]]] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
        max_sequence_length: Optional[int] = None,
    ):
        r"""Generate images from text.

        Args:
            prompt: the prompt(s).
            negative_prompt: prompt(s) for the unconditional branch; default (official) is an all-zero
                condition rather than an encoded empty prompt.
            height, width: a supported square size (see ``supported_sizes``; 1024 for the released model).
            num_inference_steps: residual diffusion steps (official 8).
            guidance_scale: classifier-free guidance ``g`` in HART's convention ``(1 + t) c - t u``, ramped
                ``t = g * si / (SN - 1)`` over the scales (official 4.5).
            top_k: None for the official schedule (600 for the first 7 scales, then 300); 0 disables.
            top_p: nucleus sampling threshold (0 disables, official).
            smooth: the official Gumbel-softmax "more_smooth" soft tokens (default on, as in sample.py).
            generator: a ``torch.Generator`` (or a list with one); the same seed gives the same images.
            prompt_embeds / prompt_attention_mask: precomputed text hidden states (B, T, Ct) and mask.
            output_type: "pil", "np", "pt" or "latent" (the :class:`HARTTokens`).
            callback_on_step_end: ``fn(pipe, scale_index, scale_index, {"latents": f_hat})`` after every
                scale; returned "latents" replace the running latent.
            max_sequence_length: text tokens (default: the transformer's ``context_tokens``, 300 released).

        Examples:
        """
        height = height or self.default_size
        width = width or self.default_size
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, top_k, top_p,
                          num_images_per_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                          output_type, callback_on_step_end_tensor_inputs)
        if isinstance(generator, list):
            if len(generator) != 1:
                raise ValueError("HART draws every image of a batch from one stream: pass a single torch.Generator.")
            generator = generator[0]
        device = self._execution_device
        if isinstance(negative_prompt, str):
            batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
            negative_prompt = [negative_prompt] * batch

        embeds, positions, neg_embeds, neg_positions = self.encode_prompt(
            prompt, negative_prompt, num_images_per_prompt, device, prompt_embeds, prompt_attention_mask,
            negative_prompt_embeds, negative_prompt_attention_mask, max_sequence_length,
        )
        patch_nums = self.patch_nums_for_size(height, width)
        num_scales = len(patch_nums)

        with self.progress_bar(total=num_scales + num_inference_steps) as progress:
            def on_scale(scale_index: int, total: int, latent: torch.Tensor) -> None:
                if callback_on_step_end is not None:
                    tensors = {"latents": latent} if "latents" in (callback_on_step_end_tensor_inputs or []) else {}
                    out = callback_on_step_end(self, scale_index, scale_index, tensors) or {}
                    if "latents" in out and out["latents"] is not latent:
                        latent.copy_(out["latents"])
                progress.update()

            tokens = generate_tokens(
                self.transformer, self.vae, embeds, positions, neg_embeds, neg_positions, patch_nums=patch_nums,
                guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, smooth=smooth, generator=generator,
                callback=on_scale,
            )
            tokens = add_residual(tokens, self.residual_head, self.scheduler, num_inference_steps,
                                  generator=generator, callback=lambda *_: progress.update())

        if output_type == "latent":
            images = tokens
        else:
            images = decode_tokens(self.vae, tokens).float()  # [0, 1]
            images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return HARTPipelineOutput(images=images)


HARTPipeline.__call__.__doc__ = HARTPipeline.__call__.__doc__.replace("        Examples:\n", EXAMPLE_DOC_STRING)
