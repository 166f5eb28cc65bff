"""``HARTPipeline``: text-to-image with HART in diffusers.

Stages: text encoding (``encode_prompt``) -> next-scale AR prediction of the discrete tokens
(``transformer``) -> residual diffusion of the continuous detail (``residual_head`` + ``scheduler``)
-> decoding (``vae``, the hybrid tokenizer).
"""

import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from huggingface_hub import create_repo

from .hub import write_model_card
from .loading import check_pipeline_folder
from .lora import HARTLoraLoaderMixin
from .models.residual_head import HARTResidualHead
from .remote_code import to_installed_index, write_remote_code
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .sampling import HARTTokens, add_residual, decode_tokens, generate_tokens
from .scheduler import HARTResidualScheduler
from .schedules import supported_sizes
from .validation import (CallArguments, check_bool, check_call_arguments, check_callback_output, check_device,
                         check_dtype, check_finite_output, check_int, check_prompts, read_json_object)

logger = logging.get_logger(__name__)

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
HART_PIPELINES = ("HARTPipeline", "HARTImg2ImgPipeline", "HARTInpaintPipeline")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from hart_pipeline import HARTPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-0.7b-1024px-diffusers", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a lemur in a magician hat", generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.save("lemur.png")
        ```
"""


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """HART's text position ids ``cumsum(mask) - 1``: right padding repeats the last valid id."""
    return mask.long().cumsum(1) - 1


_TOKENIZER_LOCK = threading.Lock()  # concurrent pipeline calls (threads) share the tokenizer's state


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: List[str], max_length: int,
                system_prompt: Optional[str] = None, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official ``encode_prompts``: fp32 hidden states (B, max_length, C) and the mask (B, max_length).

    Each prompt is padded to ``max_length`` separately; with a ``system_prompt`` the text model reads
    ``[system, prompt]`` and only the prompt positions are kept. Every position (pads included) is
    returned: HART attends to all of them. ``device``: where the text encoder runs (default its own; the
    pipeline passes its execution device, which offloaded encoders do not report).
    """
    with _TOKENIZER_LOCK:  # a fast tokenizer keeps its padding / truncation settings between calls
        ids = torch.stack([
            tokenizer(p, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids[0]
            for p in prompts
        ])
        system = None if system_prompt is None else tokenizer(
            system_prompt, max_length=max_length, truncation=True, return_tensors="pt").input_ids
    mask = (ids != tokenizer.pad_token_id).long()
    device = device or text_encoder.device
    if system is None:
        return text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float(), mask
    system = system.repeat(len(prompts), 1)
    hidden = text_encoder(
        input_ids=torch.cat([system, ids], 1).to(device),
        attention_mask=torch.cat([torch.ones_like(system), mask], 1).to(device),
    ).last_hidden_state[:, system.shape[1]:]
    return hidden.float(), mask


_THREAD_CALLS = threading.local()  # per thread: the state of each pipeline's call running in it


@dataclass
class _CallState:
    guidance_scale: Optional[float] = None
    num_timesteps: Optional[int] = None
    interrupt: bool = False


class _Interrupted(Exception):
    """Raised by the step callback once ``pipe._interrupt`` is set; ends the call early."""


def _carry_over(target: str, staging: str) -> None:
    """Hard-link (or copy) into ``staging`` what ``target`` holds beside the pipeline (training checkpoints,
    logs, a user's files), so the swap loses nothing. The previous pipeline's own entries (those its
    ``model_index.json`` names, the index itself) are not carried: the new save replaces them whole."""
    try:
        with open(os.path.join(target, "model_index.json")) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = {}
    owned = set(previous) if isinstance(previous, dict) else set()
    for name in os.listdir(target):
        source, destination = os.path.join(target, name), os.path.join(staging, name)
        if name in owned or os.path.lexists(destination):
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, destination)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _swap_folder(staging: str, target: str) -> None:
    """Replace ``target`` by the complete folder ``staging`` with renames only (no partial state in ``target``);
    files of ``target`` that are not part of the pipeline are kept (see :func:`_carry_over`)."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    _carry_over(target, staging)
    retired = f"{target}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def encode_prompt_embeds(
    tokenizer, text_encoder, prompt: Union[str, List[str], None], negative_prompt: Union[str, List[str], None],
    num_images_per_prompt: int, device: torch.device, max_length: int, system_prompt: Optional[str],
    prompt_embeds: Optional[torch.Tensor] = None, prompt_attention_mask: Optional[torch.Tensor] = None,
    negative_prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_attention_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:meth:`HARTPipeline.encode_prompt` for any holder of the text components (the modular blocks too).

    A single negative prompt string applies to every prompt (or ``prompt_embeds`` row).
    """

    def encode(texts: Union[str, List[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                "This pipeline has no text encoder: pass `prompt_embeds` (and `prompt_attention_mask`), or load "
                "one with HARTPipeline.from_pretrained(..., text_encoder=..., tokenizer=...)."
            )
        hidden, mask = encode_text(tokenizer, text_encoder, [texts] if isinstance(texts, str) else list(texts),
                                   max_length, system_prompt, device)
        return hidden, mask.to(device)

    if prompt_embeds is None:
        check_prompts("prompt", prompt, allow_none=False)
        prompt_embeds, prompt_attention_mask = encode(prompt)
    elif prompt_attention_mask is None:
        prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
    check_prompts("negative_prompt", negative_prompt, allow_none=True)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * prompt_embeds.shape[0]
    if negative_prompt_embeds is None and negative_prompt is not None:
        negative_prompt_embeds, negative_prompt_attention_mask = encode(negative_prompt)
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


@dataclass
class HARTPipelineOutput(BaseOutput):
    """
    Args:
        images: PIL images, a numpy array (B, H, W, 3) or a tensor (B, 3, H, W) in [0, 1]; with
            ``output_type="latent"`` the :class:`~hart_pipeline.sampling.HARTTokens` themselves.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor, HARTTokens]


# The class each HART component must have (checked by name, so classes loaded as remote code also pass).
COMPONENT_CLASSES = {"vae": "HARTHybridTokenizer", "transformer": "HARTTransformer",
                     "residual_head": "HARTResidualHead", "scheduler": "HARTResidualScheduler"}


def check_components(**components) -> None:
    """Each HART component is of its class (a swapped or foreign one, e.g. DDPMScheduler, fails here, not at step())."""
    for name, component in components.items():
        expected = COMPONENT_CLASSES[name]
        if component is not None and expected not in {c.__name__ for c in type(component).__mro__}:
            raise ValueError(f"`{name}` must be a {expected}; got a {type(component).__name__}. Check the `{name}` "
                             "entry of model_index.json or the component you passed.")


def check_model_index(path: str) -> dict:
    """Read a pipeline's ``model_index.json``: a JSON object for a HART pipeline whose HART entries name HART classes."""
    index = to_installed_index(read_json_object(path), __package__)  # bundled-code names -> this package
    class_name = index.get("_class_name")
    if class_name not in HART_PIPELINES:  # the HART pipelines share their components (like diffusers' tasks)
        raise ValueError(f"{path} holds a {class_name} pipeline, not a HART pipeline ({', '.join(HART_PIPELINES)}).")
    for name, expected in COMPONENT_CLASSES.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == expected):
            raise ValueError(f"{path}: the `{name}` entry must be [library, {expected!r}]; got {entry!r}.")
    for name in ("tokenizer", "text_encoder"):  # optional: [library, class] or [null, null]
        entry = index.get(name, [None, None])
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, (str, type(None))) for e in entry)):
            raise ValueError(f"{path}: the `{name}` entry must be [library, class name] or [null, null]; got {entry!r}.")
    if "use_system_prompt" in index and not isinstance(index["use_system_prompt"], bool):
        raise ValueError(f"{path}: `use_system_prompt` must be true or false; got {index['use_system_prompt']!r}.")
    return index


class HARTPipeline(DiffusionPipeline, HARTLoraLoaderMixin):
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

    # The vae (hybrid tokenizer) is used at every scale of the AR loop (codebook, running latent), so it
    # stays on the execution device under every offload mode: 112M parameters of the released model's
    # 2.4B (text encoder 1.5B, transformer 0.83B), where offloading it would move it twice per scale.
    model_cpu_offload_seq = "text_encoder->transformer->residual_head"
    _exclude_from_cpu_offload = ["vae"]
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents", "residual"]

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
        check_components(vae=vae, transformer=transformer, residual_head=residual_head, scheduler=scheduler)
        use_system_prompt = check_bool("use_system_prompt", use_system_prompt)
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              residual_head=residual_head, scheduler=scheduler)
        self.register_to_config(use_system_prompt=use_system_prompt)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae.downsample_factor if vae is not None else 16)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``model_index.json`` as the installed package reads it: the bundled-code names (see
        :mod:`~hart_pipeline.remote_code`) map to this package, so no remote code runs."""
        out = super().load_config(*args, **kwargs)
        if isinstance(out, tuple):
            return (to_installed_index(out[0], __package__),) + tuple(out[1:])
        return to_installed_index(out, __package__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "HARTPipeline":
        """Load a HART pipeline folder or Hub repo (see ``DiffusionPipeline.from_pretrained``).

        The folder's own copy of the code is not run (``DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)`` runs it). A local folder in the official layout (``llm/`` + ``tokenizer/``)
        or any other non-HART folder gives a ValueError that says how to get a loadable one; so do an invalid
        ``model_index.json``, unreadable component files and (for HART's own components, see
        :mod:`hart_pipeline.loading`) wrong configs or weights. ``dtype`` / ``torch_dtype`` must be floating
        torch dtypes (or their names).
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
            components = [k for k in check_model_index(index) if not k.startswith("_")]
            check_pipeline_folder(path, components)
        for key in ("dtype", "torch_dtype"):
            if kwargs.get(key) is not None:
                value = kwargs[key]
                kwargs[key] = ({k: check_dtype(f"{key}[{k!r}]", v) for k, v in value.items()} if isinstance(value, dict)
                               else check_dtype(key, value))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to(self, *args, **kwargs) -> "HARTPipeline":
        """``DiffusionPipeline.to`` with the device and dtype checked first (a clear error, not a torch assertion)."""
        args = tuple(check_dtype("dtype", a) if isinstance(a, torch.dtype) else check_device("device", a) for a in args)
        for key, check in (("dtype", check_dtype), ("device", check_device)):
            if kwargs.get(key) is not None:
                kwargs[key] = check(key, kwargs[key])
        return super().to(*args, **kwargs)

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, variant: Optional[str] = None,
                        push_to_hub: bool = False, **kwargs) -> None:
        """Save every component (safetensors), ``model_index.json``, the pipeline code and a model card.

        The folder is complete for ``HARTPipeline.from_pretrained`` and, without this package, for
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (the code is bundled, see
        :mod:`~hart_pipeline.remote_code`). The save is atomic: everything is written beside the folder,
        then swapped in, so an interrupted save leaves the previous folder intact. An existing README.md
        (model card) and files beside the pipeline (checkpoints, logs) are kept; the previous pipeline's own
        components are replaced whole. With ``push_to_hub=True`` the folder
        is then uploaded to ``repo_id`` (default: the folder name), with HART's model card.
        """
        hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        target = os.path.abspath(save_directory)
        repo_id = hub.get("repo_id") or os.path.basename(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=os.path.dirname(target))
        try:
            super().save_pretrained(staging, safe_serialization=safe_serialization, variant=variant, **kwargs)
            write_remote_code(staging)
            card = os.path.join(target, "README.md")
            if os.path.isfile(card):
                shutil.copy2(card, os.path.join(staging, "README.md"))
            else:
                write_model_card(staging, title=f"HART text-to-image ({repo_id})",
                                 description="A HART pipeline saved with `HARTPipeline.save_pretrained`.",
                                 repo_id=repo_id, size=self.default_size)
            _swap_folder(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if push_to_hub:
            repo_id = create_repo(repo_id, private=hub.get("private"), token=hub.get("token"), exist_ok=True).repo_id
            self._upload_folder(target, repo_id, token=hub.get("token"), commit_message=hub.get("commit_message"),
                                create_pr=hub.get("create_pr", False))

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: Optional[str] = None, **kwargs) -> str:
        """Upload the pipeline (components, ``model_index.json``, its code, HART model card) to ``repo_id``."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "pipeline")
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant, repo_id=repo_id)
            return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    def enable_group_offload(self, onload_device: torch.device, *args, exclude_modules=None, **kwargs) -> None:
        """diffusers' group offloading of every component but the vae (see ``_exclude_from_cpu_offload``)."""
        exclude = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules or [])
        exclude += [name for name in self._exclude_from_cpu_offload if name not in exclude]
        super().enable_group_offload(onload_device, *args, exclude_modules=exclude, **kwargs)

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def supported_sizes(self) -> Dict[int, Tuple[int, ...]]:
        """Square image side -> patch schedule: the model's own schedule and the standard ones."""
        return supported_sizes(self.transformer.config.patch_nums, self.vae.downsample_factor)

    def patch_nums_for_size(self, height: int, width: int) -> Tuple[int, ...]:
        sizes = self.supported_sizes
        if height != width or height not in sizes:
            valid = ", ".join(f"{s}x{s}" for s in sorted(sizes))
            raise ValueError(f"HART generates square images: `height` and `width` must be one of {valid} for this model; "
                             f"got height={height}, width={width}.")
        warned = self.__dict__.setdefault("_warned_sizes", set())  # other sizes than the trained one: warn once each
        if height != self.default_size and height not in warned:
            warned.add(height)
            logger.warning(
                f"This model was trained at {self.default_size}x{self.default_size}; {height}x{height} runs HART's "
                f"patch schedule for that size ({', '.join(map(str, sizes[height]))}), which the model never saw, so "
                f"expect scattered fragments rather than the prompt. Generate at {self.default_size} (the default) "
                "unless the model was trained at this size too."
            )
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
        device = self._execution_device if device is None else check_device("device", device)
        max_length = self.transformer.config.context_tokens if max_sequence_length is None else check_int(
            "max_sequence_length", max_sequence_length, 1)
        return encode_prompt_embeds(
            self.tokenizer, self.text_encoder, prompt, negative_prompt, num_images_per_prompt, device, max_length,
            SYSTEM_PROMPT if self.config.use_system_prompt else None, prompt_embeds, prompt_attention_mask,
            negative_prompt_embeds, negative_prompt_attention_mask,
        )

    # ------------------------------------------------------------------------------------------------ checks
    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, top_k, top_p,
                     num_images_per_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                     output_type, callback_on_step_end_tensor_inputs, negative_prompt_attention_mask=None,
                     generator=None, smooth=True, return_dict=True, callback_on_step_end=None,
                     max_sequence_length=None, residual_guidance_scale=None) -> CallArguments:
        """Validate every argument of ``__call__`` (see :mod:`hart_pipeline.validation`); return the scalars as
        plain Python values (numpy / 0-d torch integers accepted). A bad one raises a ValueError naming it."""
        return check_call_arguments(
            self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, top_k, top_p,
            num_images_per_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs,
            generator=generator, smooth=smooth, return_dict=return_dict, max_sequence_length=max_sequence_length,
            output_types=OUTPUT_TYPES, residual_guidance_scale=residual_guidance_scale,
        )

    # ------------------------------------------------------------------------------------------------ call state
    @property
    def _call_state(self) -> "_CallState":
        """The state of the call running in this thread (calls in other threads have their own)."""
        states = _THREAD_CALLS.__dict__.setdefault("states", {})
        return states.setdefault(id(self), _CallState())

    @property
    def guidance_scale(self) -> Optional[float]:
        """The ``guidance_scale`` of the current (or last) call in this thread."""
        return self._call_state.guidance_scale

    @property
    def num_timesteps(self) -> Optional[int]:
        """Callback steps of the current (or last) call in this thread: scales + residual steps."""
        return self._call_state.num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._call_state.interrupt

    @property
    def _interrupt(self) -> bool:
        return self._call_state.interrupt

    @_interrupt.setter
    def _interrupt(self, value: bool) -> None:
        """Set ``pipe._interrupt = True`` in a callback to stop the call (diffusers' convention)."""
        self._call_state.interrupt = value

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
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
        num_maskgit_iters: int = 1,
        guidance_stop_scale: Optional[int] = None,
        token_pruning: Optional[Dict[int, float]] = None,
        residual_guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Union[Callable[["HARTPipeline", int, int, Dict[str, Any]], Dict[str, Any]],
                                    PipelineCallback, MultiPipelineCallbacks, None] = None,
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
            num_maskgit_iters: iterations of the official MaskGIT-style final scale (1 = official default: all
                its tokens at once); its random orders are seeded from ``generator``.
            guidance_stop_scale: opt-in speed-up (Switti): no guidance from this scale index on (nor in the
                residual stage); the unconditional half of the batch is dropped there. None = official.
            token_pruning: opt-in speed-up (FastVAR): ``{patch side: fraction of tokens pruned}`` (e.g.
                ``{48: 0.5, 64: 0.75}`` at 1024px). None = official. Trade-offs: ``benchmarks/fast_modes.py``.
            residual_guidance_scale: guidance of the residual stage (HART's convention, 0 = the conditional
                prediction alone). None: the scheduler's ``guidance_scale`` (the model's default; the built-in
                model's is 0), else the final scale's guidance of the ramp (official).
            generator: a ``torch.Generator`` (or a list with one); the same seed gives the same images.
            prompt_embeds / prompt_attention_mask: precomputed text hidden states (B, T, Ct) and mask.
            output_type: "pil", "np", "pt" or "latent" (the :class:`HARTTokens`).
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` (or a diffusers
                ``PipelineCallback`` / ``MultiPipelineCallbacks``) after every scale and every residual step:
                ``pipe.num_timesteps`` steps numbered ``0 .. SN-1`` for the scales (``timestep`` = the scale
                index) then ``SN .. SN+num_inference_steps-1`` for the residual steps (``timestep`` = the
                diffusion timestep, 999 -> 0). ``tensors`` holds those named in
                ``callback_on_step_end_tensor_inputs``: "latents" = the running discrete latent (B, Cv, h, w),
                "residual" = the residual being denoised (B, Cv, h, w), residual steps only. Returned
                tensors replace them. ``pipe._interrupt = True`` stops the call: the latent so far is decoded
                (no residual).
            max_sequence_length: text tokens (default: the transformer's ``context_tokens``, 300 released).

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        (height, width, num_inference_steps, guidance_scale, top_k, top_p, num_images_per_prompt, generator,
         max_sequence_length, residual_guidance_scale) = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, top_k, top_p,
            num_images_per_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds, output_type,
            callback_on_step_end_tensor_inputs, negative_prompt_attention_mask, generator, smooth, return_dict,
            callback_on_step_end, max_sequence_length, residual_guidance_scale)
        device = self._execution_device
        patch_nums = self.patch_nums_for_size(height, width)
        num_scales = len(patch_nums)
        call = self._call_state
        # the residual stage samples the MaskGIT groups one after the other
        num_residual_steps = num_inference_steps * (num_maskgit_iters if isinstance(num_maskgit_iters, int) else 1)
        call.guidance_scale, call.num_timesteps, call.interrupt = guidance_scale, num_scales + num_residual_steps, False

        embeds, positions, neg_embeds, neg_positions = self.encode_prompt(
            prompt, negative_prompt, num_images_per_prompt, device, prompt_embeds, prompt_attention_mask,
            negative_prompt_embeds, negative_prompt_attention_mask, max_sequence_length,
        )
        inputs = set(callback_on_step_end_tensor_inputs or [])
        running = {}  # the latest running latent: what an interrupted call decodes

        def step_end(step: int, timestep: int, latent: torch.Tensor, residual: Optional[torch.Tensor] = None):
            """Progress, callback_on_step_end and interrupt after every scale and residual step."""
            running["latent"] = latent
            progress.update()
            out = {}
            if callback_on_step_end is not None:
                tensors = {k: v for k, v in (("latents", latent), ("residual", residual)) if v is not None}
                out = check_callback_output(
                    callback_on_step_end(self, step, timestep, {k: v for k, v in tensors.items() if k in inputs}), tensors)
                if "latents" in out and out["latents"] is not latent:
                    latent.copy_(out["latents"])
            if self.interrupt:
                raise _Interrupted
            return out.get("residual")

        tokens = None
        with self.progress_bar(total=num_scales + num_residual_steps) as progress:
            try:
                tokens = generate_tokens(
                    self.transformer, self.vae, embeds, positions, neg_embeds, neg_positions, patch_nums=patch_nums,
                    guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, smooth=smooth, generator=generator,
                    num_maskgit_iters=num_maskgit_iters, guidance_stop_scale=guidance_stop_scale,
                    token_pruning=token_pruning, callback=lambda si, _, latent: step_end(si, si, latent),
                )
                tokens = add_residual(tokens, self.residual_head, self.scheduler, num_inference_steps,
                                      guidance_scale=residual_guidance_scale, generator=generator,
                                      callback=lambda i, t, x: step_end(num_scales + i, t, tokens.latent, x))
            except _Interrupted:
                tokens = HARTTokens(indices=tokens.indices if tokens is not None else [], latent=running["latent"])

        check_finite_output("latents", tokens.latent if tokens.residual is None else tokens.latent + tokens.residual)
        if output_type == "latent":
            images = tokens
        else:
            images = check_finite_output("images", decode_tokens(self.vae, tokens).float())  # [0, 1]
            images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return HARTPipelineOutput(images=images)


