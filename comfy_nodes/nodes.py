"""The HART nodes: one small function per stage, each a thin call into ``hart_pipeline``.

Each node is a :class:`NodeSpec` (inputs, outputs, tooltips) plus its function; ``registration.py``
turns the same specs into classic (``INPUT_TYPES``) and ``comfy_api`` (``io.ComfyNode``) node classes.
No algorithm lives here: text encoding is ``HARTPipeline.encode_prompt``, sampling is
``generate_tokens`` / ``add_residual``, decoding ``decode_tokens``, tokenization ``vae.encode``.
"""

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from hart_pipeline import HARTPipeline, add_residual, decode_tokens, edit_tokens, encode_images, generate_tokens
from hart_pipeline.schedules import PATCH_NUMS

from . import runtime
from .handles import HART_CONDITIONING, HART_MODEL, HART_TOKENS, HARTConditioning, HARTModel, HARTTokenHandle
from .validation import (MAX_SEED, check_batch_size, check_handle, check_image, check_indices, check_number, check_seed,
                         check_size)

CATEGORY = "HART"
BUILTIN_MODEL = "built-in default model"
OWN_TEXT_ENCODER = "from the model folder"
AUTO_SIZE = "auto"
DOWNSAMPLE_FACTORS = (8, 16)  # the built-in tokenizer's and the released one's
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ["auto", "cpu", "cuda"]


# ------------------------------------------------------------------------------------------------- specs
@dataclass
class In:
    """One node input: a socket (custom types, IMAGE) or a widget (INT, FLOAT, STRING, BOOLEAN, COMBO)."""

    name: str
    type: str
    tooltip: str
    default: Any = None
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    options: Union[None, Sequence[str], Callable[[], List[str]]] = None
    multiline: bool = False
    optional: bool = False
    # The frontend adds a "control after generate" widget (default: randomize) to every INT input named
    # seed unless the schema says otherwise: True/False is always written into the schema.
    control_after_generate: Optional[bool] = None

    WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

    @property
    def is_widget(self) -> bool:
        return self.type in self.WIDGET_TYPES

    def combo_options(self) -> List[str]:
        return list(self.options() if callable(self.options) else self.options)


@dataclass
class Out:
    type: str
    name: str
    tooltip: str


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: List[In]
    outputs: List[Out]
    function: Callable[..., tuple]
    category: str = CATEGORY
    search_aliases: Sequence[str] = ()


# ------------------------------------------------------------------------------------------------- helpers
def _generator(seed: int) -> torch.Generator:
    """A CPU generator, as HARTPipeline's users pass one: same seed, same draws on every device."""
    return torch.Generator().manual_seed(int(seed))


def _to_image(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3) float32 on the CPU."""
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def size_options() -> List[str]:
    """The combo's sizes: every size of every known model (the list is fixed when ComfyUI reads the node
    definitions, before a model is loaded); the nodes check the choice against the loaded model."""
    from hart_pipeline.default_model import DEFAULT_MODEL_DIR

    sizes = {pns[-1] * f for pns in PATCH_NUMS.values() for f in DOWNSAMPLE_FACTORS}
    for folder in [str(DEFAULT_MODEL_DIR)] + [runtime.resolve_folder(n) for n in runtime.list_folders(("diffusers",))]:
        sizes.update(runtime.folder_sizes(folder))
    return [AUTO_SIZE] + [str(s) for s in sorted(sizes)]


def model_side(model: HARTModel, size: str, input_name: str = "size", auto: Optional[int] = None) -> int:
    """The image side for a size choice, checked against the loaded model before any work is done."""
    pipe = model.pipe
    if size == AUTO_SIZE:
        return auto if auto is not None else pipe.default_size
    try:
        side = int(size)
    except (TypeError, ValueError):
        side = size
    return check_size(input_name, side, pipe.supported_sizes, pipe.default_size, model.name, extra=[AUTO_SIZE])


def _preview_callback(model: HARTModel, progress: runtime.Progress, preview: Optional[bool]):
    """AR-loop callback: one progress step per scale, the running latent as the node's preview, Cancel."""
    show = preview is not False and progress.shows_previews

    def callback(_si, _num_scales, f_hat):
        runtime.check_interrupt()  # before the preview: a Cancel during the scale stops right here
        progress.update(1, preview=model.preview(f_hat) if show else None)
    return callback


def _stage_callback(progress: runtime.Progress):
    def callback(*_):
        progress.update(1)
        runtime.check_interrupt()  # between scales / steps: ComfyUI's Cancel stops here
    return callback


# ------------------------------------------------------------------------------------------------- loader
def model_options() -> List[str]:
    return [BUILTIN_MODEL] + list(runtime.RELEASED_MODELS) + runtime.list_folders(("diffusers", "official"))


def text_encoder_options() -> List[str]:
    return [OWN_TEXT_ENCODER] + runtime.list_folders(("text_encoder",))


def load_model(model: str, text_encoder: str, dtype: str, device: str, offload: bool) -> Tuple[HARTModel]:
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {', '.join(DEVICES)}; got {device!r}.")
    if device == "auto":
        target = runtime.torch_device()
    else:
        from hart_pipeline.validation import check_device

        target = check_device("device", device)  # e.g. cuda on a CPU-only torch: say so, before any loading
    torch_dtype = DTYPES[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    extra = {}
    if text_encoder != OWN_TEXT_ENCODER:
        from transformers import AutoModel, AutoTokenizer

        path = runtime.resolve_folder(text_encoder)
        extra = {"text_encoder": AutoModel.from_pretrained(path, dtype=torch_dtype),
                 "tokenizer": AutoTokenizer.from_pretrained(path)}
    if model == BUILTIN_MODEL:
        from hart_pipeline.default_model import load_default_pipeline

        pipe = load_default_pipeline(torch_dtype)
        if extra:
            pipe.register_modules(**extra)
    else:
        path = runtime.download_released(model) if model in runtime.RELEASED_MODELS else runtime.resolve_folder(model)
        if runtime.model_kind(path) == "official":
            from hart_pipeline.convert import convert_official

            parts = convert_official(path)
            pipe = HARTPipeline(tokenizer=extra.get("tokenizer"), text_encoder=extra.get("text_encoder"),
                                vae=parts.vae, transformer=parts.transformer, residual_head=parts.residual_head,
                                scheduler=parts.scheduler, use_system_prompt=True).to(dtype=torch_dtype)
        else:
            pipe = HARTPipeline.from_pretrained(path, dtype=torch_dtype, **extra)
    offload_to = runtime.offload_device()
    # Inside ComfyUI its model management moves each component to the device when a stage needs it.
    pipe.to(offload_to if offload or runtime.model_management_available() else target)
    return (HARTModel(pipe=pipe, name=model, device=target, offload_device=offload_to, dtype=torch_dtype,
                      offload=offload),)


# ------------------------------------------------------------------------------------------------- text
def text_encode(model: HARTModel, prompt: str) -> Tuple[HARTConditioning]:
    with model.stage("text_encoder") as pipe:
        embeds, position_ids, _, _ = pipe.encode_prompt(prompt, device=model.device)
    return (HARTConditioning(embeds=embeds, position_ids=position_ids,
                             attention_mask=HARTConditioning.mask_from_position_ids(position_ids), prompt=prompt),)


def empty_conditioning() -> Tuple[HARTConditioning]:
    return (HARTConditioning(embeds=None, position_ids=None),)


# ------------------------------------------------------------------------------------------------- tokenizer
def _square(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> centre-cropped to a square and resized to ``side``."""
    h, w = images.shape[-2:]
    crop = min(h, w)
    top, left = (h - crop) // 2, (w - crop) // 2
    images = images[..., top:top + crop, left:left + crop]
    if crop != side:
        images = F.interpolate(images, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return images.clamp(0, 1)


def tokenizer_encode(model: HARTModel, image: torch.Tensor, resize: str) -> Tuple[HARTTokenHandle]:
    pipe = model.pipe
    images = check_image("image", image)[..., :3].permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 1]
    if resize == "none":
        h, w = images.shape[-2:]
        if h != w:
            raise ValueError(f"`image` is {w}x{h}; with resize = none it must be square: pick auto or a size.")
        side = check_size("image side", h, pipe.supported_sizes, pipe.default_size, model.name)
    else:
        side = model_side(model, resize, "resize")
        images = _square(images, side)
    with model.stage("vae") as pipe:
        tokens = encode_images(pipe.vae, images, pipe.patch_nums_for_size(side, side))
    return (HARTTokenHandle(tokens=tokens, patch_nums=pipe.vae.patch_nums_from_indices(tokens.indices)),)


def tokenizer_decode(model: HARTModel, tokens: HARTTokenHandle, discrete_only: bool) -> Tuple[torch.Tensor]:
    check_handle("tokens", tokens, HARTTokenHandle, "HART AR Sampler, HART Residual Diffusion or HART Tokenizer Encode")
    check_indices("tokens", tokens.tokens.indices, model.pipe.vae.config.vocab_size)
    with model.stage("vae") as pipe:
        images = decode_tokens(pipe.vae, tokens.tokens, discrete_only=discrete_only)
    return (_to_image(images),)


# ------------------------------------------------------------------------------------------------- sampling
def _check_maskgit(num_maskgit_iters: Optional[int]) -> int:
    if num_maskgit_iters is None:
        return 1
    if isinstance(num_maskgit_iters, bool) or not isinstance(num_maskgit_iters, int) or num_maskgit_iters < 1:
        raise ValueError(f"`num_maskgit_iters` must be an integer >= 1 (1 = official); got {num_maskgit_iters!r}.")
    return num_maskgit_iters


def _condition_rows(positive: HARTConditioning, negative: Optional[HARTConditioning], batch_size: int):
    """(context, position_ids, negative context or None, negative position ids or None), batch_size per prompt."""
    check_handle("positive", positive, HARTConditioning, "HART Text Encode")
    if negative is not None:
        check_handle("negative", negative, HARTConditioning, "HART Text Encode or HART Empty Conditioning")
    check_batch_size(batch_size)
    if positive.is_empty:
        raise ValueError("`positive` must be a text conditioning (HART Text Encode), not the empty one.")
    context, position_ids = positive.rows(batch_size)
    B = context.shape[0]
    neg_context = neg_positions = None
    if negative is not None and not negative.is_empty:
        neg_context, neg_positions = negative.rows(batch_size)
        if neg_context.shape[0] == 1 and B > 1:
            neg_context, neg_positions = neg_context.expand(B, -1, -1), neg_positions.expand(B, -1)
        if neg_context.shape[0] != B:
            raise ValueError(f"The negative conditioning has {neg_context.shape[0]} rows for {B} positive rows.")
        if neg_context.shape[-1] != context.shape[-1]:
            raise ValueError(f"The negative conditioning's text states are {neg_context.shape[-1]} wide, the positive's "
                             f"{context.shape[-1]}: encode both with the same model's HART Text Encode.")
    return context, position_ids, neg_context, neg_positions


def ar_sample(model: HARTModel, positive: HARTConditioning, seed: int, guidance: float, top_k: int, top_p: float,
              smooth: bool, size: str, batch_size: int, keep_scales: int,
              negative: Optional[HARTConditioning] = None, prefix: Optional[HARTTokenHandle] = None,
              num_maskgit_iters: Optional[int] = None, preview: Optional[bool] = None) -> Tuple[HARTTokenHandle]:
    pipe = model.pipe
    check_seed("seed", seed)
    check_number("guidance", guidance, 0.0, 1000.0)
    check_number("top_p", top_p, 0.0, 1.0, high_inclusive=False)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise ValueError(f"`top_k` must be -1 (the official schedule), 0 (off) or a positive integer; got {top_k!r}.")
    num_maskgit_iters = _check_maskgit(num_maskgit_iters)
    context, position_ids, neg_context, neg_positions = _condition_rows(positive, negative, batch_size)
    B = context.shape[0]
    prefix_indices = None
    if prefix is not None:
        check_handle("prefix", prefix, HARTTokenHandle, "HART Tokenizer Encode")
    if prefix is not None and keep_scales > 0:
        prefix_indices = [i if i.shape[0] == B else i.expand(B, -1) for i in prefix.tokens.indices[:keep_scales]]
        if prefix.batch_size not in (1, B):
            raise ValueError(f"The prefix tokens hold {prefix.batch_size} images; the sampler makes {B}.")
    if prefix is not None:
        check_indices("prefix", prefix.tokens.indices, pipe.vae.config.vocab_size)
    auto = prefix.patch_nums[-1] * pipe.vae.downsample_factor if prefix is not None else None
    side = model_side(model, size, auto=auto)
    patch_nums = pipe.patch_nums_for_size(side, side)
    if prefix_indices is not None and tuple(prefix.patch_nums[:keep_scales]) != tuple(patch_nums[:keep_scales]):
        raise ValueError(f"The prefix was encoded at {prefix.patch_nums[-1] * pipe.vae.downsample_factor} px (scales "
                         f"{tuple(prefix.patch_nums)}), the sampler draws {side} px (scales {tuple(patch_nums)}): set "
                         f"`size` to auto, or encode the image at {side} px with HART Tokenizer Encode.")
    generator = _generator(seed)
    progress = runtime.Progress(len(patch_nums))
    with model.stage("transformer", "vae") as pipe:
        dev = model.device
        tokens = generate_tokens(
            pipe.transformer, pipe.vae, context.to(dev), position_ids.to(dev),
            None if neg_context is None else neg_context.to(dev), None if neg_positions is None else neg_positions.to(dev),
            patch_nums=patch_nums, guidance_scale=guidance, top_k=None if top_k < 0 else top_k, top_p=top_p,
            smooth=smooth, generator=generator, prefix_indices=prefix_indices, num_maskgit_iters=num_maskgit_iters,
            callback=_preview_callback(model, progress, preview),
        )
    return (HARTTokenHandle(tokens=tokens, patch_nums=tuple(patch_nums), generator_state=generator.get_state(),
                            seed=seed),)


def residual_diffusion(model: HARTModel, tokens: HARTTokenHandle, steps: int, guidance: float, seed: int,
                       preview: Optional[bool] = None) -> Tuple[HARTTokenHandle]:
    check_handle("tokens", tokens, HARTTokenHandle, "HART AR Sampler, HART Variation or HART Inpaint")
    check_seed("seed", seed, allow_continue=True)
    if not (isinstance(guidance, (int, float)) and guidance == -1):
        check_number("guidance", guidance, 0.0, 1000.0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"`steps` must be an integer >= 2 (official 8); got {steps!r}.")
    groups = tokens.tokens.residual_positions  # [] = an edit that kept every token: nothing to re-sample
    if tokens.tokens.residual_condition is None and groups != []:
        raise ValueError("These HART_TOKENS have no residual condition: connect the HART AR Sampler's output "
                         "(tokens from HART Tokenizer Encode already carry their residual).")
    if seed >= 0:
        generator = _generator(seed)
    elif tokens.generator_state is not None:
        generator = torch.Generator()
        generator.set_state(tokens.generator_state)  # continue the AR stage's stream, as HARTPipeline does
    else:
        generator = _generator(0)
    progress = runtime.Progress(steps * (1 if groups is None else max(1, len(groups))))  # MaskGIT: one run per group
    with model.stage("residual_head") as pipe:
        out = add_residual(tokens.tokens, pipe.residual_head, pipe.scheduler, num_inference_steps=steps,
                           guidance_scale=None if guidance < 0 else guidance, generator=generator,
                           callback=_stage_callback(progress))
    if preview is not False and progress.shows_previews:  # the finished latent (discrete + residual)
        progress.update(0, preview=model.preview(out.latent + out.residual))
    return (HARTTokenHandle(tokens=out, patch_nums=tokens.patch_nums, generator_state=None, seed=tokens.seed),)


def generate(model: HARTModel, prompt: str, negative_prompt: str, seed: int, size: str, steps: int, guidance: float,
             batch_size: int, preview: Optional[bool] = None) -> Tuple[torch.Tensor]:
    check_batch_size(batch_size)
    check_seed("seed", seed)
    check_number("guidance", guidance, 0.0, 1000.0)
    side = model_side(model, size)
    num_scales = len(model.pipe.patch_nums_for_size(side, side))
    progress = runtime.Progress(num_scales + steps)  # the pipeline calls back after every scale and residual step
    on_scale_latent = _preview_callback(model, progress, preview)

    def on_step(_pipe, i, _t, tensors):
        if i < num_scales:
            on_scale_latent(i, None, tensors["latents"])
        else:
            _stage_callback(progress)()
        return {}

    with model.stage("text_encoder", "transformer", "residual_head", "vae") as pipe:
        images = pipe(prompt, negative_prompt=negative_prompt or None, height=side, width=side,
                      num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=batch_size,
                      generator=_generator(seed), output_type="pt", callback_on_step_end=on_step,
                      callback_on_step_end_tensor_inputs=["latents"]).images
    return (_to_image(images),)


# ------------------------------------------------------------------------------------------------- editing
def edit_sample(model: HARTModel, positive: HARTConditioning, image: torch.Tensor, seed: int, guidance: float,
                strength: float, batch_size: int, mask: Optional[torch.Tensor] = None,
                negative: Optional[HARTConditioning] = None, num_maskgit_iters: Optional[int] = None,
                preview: Optional[bool] = None) -> Tuple[HARTTokenHandle]:
    """The AR stage of a variation (no mask) or an inpainting (mask, 1 = repaint): ``edit_tokens``."""
    check_seed("seed", seed)
    check_number("guidance", guidance, 0.0, 1000.0)
    check_number("strength", strength, 0.0, 1.0)
    num_maskgit_iters = _check_maskgit(num_maskgit_iters)
    (image_tokens,) = tokenizer_encode(model, image, AUTO_SIZE)
    repaint = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            raise ValueError(f"`mask` must be a ComfyUI MASK, (H, W) or (B, H, W); got {getattr(mask, 'shape', type(mask))}.")
        mask = mask if mask.ndim == 3 else mask[None]
        if tuple(mask.shape[-2:]) != tuple(image.shape[1:3]):
            raise ValueError(f"`mask` is {mask.shape[-1]}x{mask.shape[-2]} but `image` is {image.shape[2]}x{image.shape[1]}; "
                             "use a mask of the image's size.")
        if not bool(torch.isfinite(mask).all()):
            raise ValueError("`mask` holds NaN or infinite values.")
        side = image_tokens.patch_nums[-1] * model.pipe.vae.downsample_factor
        repaint = (_square(mask[:, None].float(), side) >= 0.5).float()
    context, position_ids, neg_context, neg_positions = _condition_rows(positive, negative, batch_size)
    generator = _generator(seed)
    progress = runtime.Progress(len(image_tokens.patch_nums))
    with model.stage("transformer", "vae") as pipe:
        dev = model.device
        tokens = edit_tokens(
            pipe.transformer, pipe.vae, image_tokens.tokens, context.to(dev), position_ids.to(dev), strength=strength,
            repaint_mask=None if repaint is None else repaint.to(dev),
            negative_context=None if neg_context is None else neg_context.to(dev),
            negative_position_ids=None if neg_positions is None else neg_positions.to(dev),
            guidance_scale=guidance, generator=generator, num_maskgit_iters=num_maskgit_iters,
            callback=_preview_callback(model, progress, preview),
        )
    return (HARTTokenHandle(tokens=tokens, patch_nums=image_tokens.patch_nums, generator_state=generator.get_state(),
                            seed=seed),)


def variation(model: HARTModel, positive: HARTConditioning, image: torch.Tensor, seed: int, guidance: float,
              strength: float, batch_size: int, negative: Optional[HARTConditioning] = None,
              num_maskgit_iters: Optional[int] = None, preview: Optional[bool] = None) -> Tuple[HARTTokenHandle]:
    return edit_sample(model, positive, image, seed, guidance, strength, batch_size, None, negative, num_maskgit_iters,
                       preview)


def inpaint(model: HARTModel, positive: HARTConditioning, image: torch.Tensor, mask: torch.Tensor, seed: int,
            guidance: float, strength: float, batch_size: int, negative: Optional[HARTConditioning] = None,
            num_maskgit_iters: Optional[int] = None, preview: Optional[bool] = None) -> Tuple[HARTTokenHandle]:
    return edit_sample(model, positive, image, seed, guidance, strength, batch_size, mask, negative, num_maskgit_iters,
                       preview)


# ------------------------------------------------------------------------------------------------- LoRA
def load_lora(model: HARTModel, lora_name: str, strength: float) -> Tuple[HARTModel]:
    """A HART_MODEL with one more LoRA adapter (transformer and residual head) at ``strength``.

    The adapter is loaded once into the shared pipeline (named after the file and its modification time);
    the returned handle activates it, with the adapters of ``model``, at every stage."""
    check_number("strength", strength, -10.0, 10.0)
    path = runtime.resolve_lora(lora_name)
    stat = os.stat(path)
    name = "hart_lora_" + hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    if not any(name in adapters for adapters in model.pipe.get_list_adapters().values()):
        model.pipe.load_lora_weights(path, adapter_name=name)
    adapters = tuple((n, w) for n, w in model.adapters if n != name) + ((name, float(strength)),)
    return (replace(model, adapters=adapters),)


# ------------------------------------------------------------------------------------------------- the specs
MODEL_IN = In("model", HART_MODEL, "The HART model from HART Loader.")
SEED_TIP = "Random seed. The same seed gives the same image as HARTPipeline(generator=torch.Generator().manual_seed(seed))."
SIZE_TIP = ("Square image side. The list holds every known model's sizes; the loaded model's are checked before "
            "sampling (built-in model: 64 (its own), 128, 256, 512; released HART: 1024 (its own), 512, 256).")
PREVIEW_TIP = "Show the image forming scale by scale (a cheap latent-to-RGB preview on the node)."
RESIDUAL_SEED_TIP = ("-1 (default) = continue the AR sampler's random stream: the chain then gives exactly the image "
                     "of HARTPipeline with the AR seed, and re-running reproduces it. >= 0 = a fresh generator with this "
                     "seed (other residual detail on the same tokens). Not randomized after each run.")
GUIDANCE_TIP = ("Classifier-free guidance in HART's convention (1+g)*cond - g*uncond, ramped over the scales as "
                "in the official code (official 4.5).")

MASKGIT_IN = In("num_maskgit_iters", "INT", "Iterations of the official MaskGIT-style final scale (1 = official "
                "default: all its tokens at once).", default=1, min=1, max=4096, optional=True)
NODE_SPECS: List[NodeSpec] = [
    NodeSpec(
        "HARTLoader", "HART Loader",
        "Load a HART model: the built-in small default model, the released HART by its Hub id (downloaded and "
        "converted once), or a folder in ComfyUI/models/hart (diffusers layout, or the official llm/ + tokenizer/ "
        "layout, converted in memory).",
        [In("model", "COMBO", "A folder in ComfyUI/models/hart, the small built-in model that ships with the pack, or a "
            "released model by its Hub id (downloaded into models/hart and converted once, on first use).",
            default=BUILTIN_MODEL, options=model_options),
         In("text_encoder", "COMBO", "Text encoder folder (e.g. Qwen2-VL-1.5B-Instruct for the released model) in "
            "ComfyUI/models/hart; needed for official-layout folders and converted folders saved without one.",
            default=OWN_TEXT_ENCODER, options=text_encoder_options),
         In("dtype", "COMBO", "Weight dtype; auto = bfloat16 on CUDA, float32 elsewhere.", default="auto",
            options=list(DTYPES)),
         In("device", "COMBO", "Where the model runs; auto = ComfyUI's device.", default="auto", options=DEVICES),
         In("offload", "BOOLEAN", "Keep the weights on ComfyUI's offload device (CPU) and move each component to the "
            "device only for its stage: less GPU memory, slower.", default=False)],
        [Out(HART_MODEL, "model", "The HART pipeline (text encoder, AR transformer, residual head, hybrid tokenizer).")],
        load_model,
        search_aliases=("hart checkpoint loader", "load hart", "hybrid autoregressive transformer", "mit-han-lab hart"),
    ),
    NodeSpec(
        "HARTTextEncode", "HART Text Encode",
        "Encode a prompt with the model's text encoder (HARTPipeline.encode_prompt).",
        [MODEL_IN, In("prompt", "STRING", "The text prompt.", default="", multiline=True)],
        [Out(HART_CONDITIONING, "conditioning", "Text hidden states, position ids and mask.")],
        text_encode,
        search_aliases=("hart prompt", "hart clip text encode", "hart conditioning"),
    ),
    NodeSpec(
        "HARTEmptyConditioning", "HART Empty Conditioning",
        "The official unconditional branch: an all-zero text condition with position ids 0 (the default negative).",
        [],
        [Out(HART_CONDITIONING, "conditioning", "The all-zero unconditional condition.")],
        empty_conditioning,
        search_aliases=("hart negative", "hart unconditional", "hart zero conditioning"),
    ),
    NodeSpec(
        "HARTTokenizerEncode", "HART Tokenizer Encode",
        "Tokenize images with HART's hybrid tokenizer (vae.encode): per-scale discrete indices + a continuous residual.",
        [MODEL_IN, In("image", "IMAGE", "Square images; see resize."),
         In("resize", "COMBO", "none: use the image as is (square, side a multiple of 16 with a patch schedule); "
            "auto: center-crop and resize to the model's size; or one of the model's sizes (checked before encoding).",
            default=AUTO_SIZE, options=lambda: ["none"] + size_options())],
        [Out(HART_TOKENS, "tokens", "Hybrid tokens (indices per scale + residual).")],
        tokenizer_encode,
        search_aliases=("hart vae encode", "hart image to tokens", "hart tokenize"),
    ),
    NodeSpec(
        "HARTTokenizerDecode", "HART Tokenizer Decode",
        "Decode hybrid tokens to images (decode_tokens).",
        [MODEL_IN, In("tokens", HART_TOKENS, "Hybrid tokens."),
         In("discrete_only", "BOOLEAN", "Decode only the discrete tokens, without the continuous residual.",
            default=False)],
        [Out("IMAGE", "image", "The decoded images.")],
        tokenizer_decode,
        search_aliases=("hart vae decode", "hart tokens to image"),
    ),
    NodeSpec(
        "HARTARSampler", "HART AR Sampler",
        "Stage 1: predict the discrete tokens scale by scale (generate_tokens). Feed the result to HART Residual "
        "Diffusion.",
        [MODEL_IN,
         In("positive", HART_CONDITIONING, "The prompt's conditioning."),
         In("seed", "INT", SEED_TIP, default=0, min=0, max=MAX_SEED, control_after_generate=True),
         In("guidance", "FLOAT", GUIDANCE_TIP, default=4.5, min=0.0, max=30.0, step=0.1),
         In("top_k", "INT", "Top-k sampling; -1 = the official schedule (600 for the first 7 scales, then 300); "
            "0 disables.", default=-1, min=-1, max=65536),
         In("top_p", "FLOAT", "Nucleus sampling threshold in [0, 1); 0 disables (official).", default=0.0, min=0.0,
            max=0.99, step=0.01),
         In("smooth", "BOOLEAN", "The official Gumbel-softmax 'more smooth' soft tokens.", default=True),
         In("size", "COMBO", SIZE_TIP + " auto = the prefix's size when a prefix is connected, else the model's own.",
            default=AUTO_SIZE, options=size_options),
         In("batch_size", "INT", "Images per prompt.", default=1, min=1, max=64),
         In("keep_scales", "INT", "With a prefix: how many coarse scales to keep from it (the rest are sampled).",
            default=4, min=0, max=64),
         In("negative", HART_CONDITIONING, "Optional negative conditioning; unconnected (or HART Empty "
            "Conditioning) = the official all-zero condition.", optional=True),
         In("prefix", HART_TOKENS, "Optional tokens (e.g. HART Tokenizer Encode of an image) whose first keep_scales "
            "scales are kept: variations of that image.", optional=True),
         MASKGIT_IN,
         In("preview", "BOOLEAN", PREVIEW_TIP, default=True, optional=True)],
        [Out(HART_TOKENS, "tokens", "Discrete tokens, the residual head's condition and the generator state.")],
        ar_sample,
        search_aliases=("hart ksampler", "hart sampler", "next-scale prediction", "autoregressive sampler",
                        "var sampler"),
    ),
    NodeSpec(
        "HARTResidualDiffusion", "HART Residual Diffusion",
        "Stage 2: add the continuous residual with the residual diffusion head (add_residual).",
        [MODEL_IN, In("tokens", HART_TOKENS, "Tokens from HART AR Sampler."),
         In("steps", "INT", "Residual diffusion steps (official 8).", default=8, min=2, max=1000),
         In("guidance", "FLOAT", "Residual guidance (0 = none); -1 = the model's default: its scheduler's guidance_scale "
                                      "(0 for the built-in model), else the AR sampler's final-scale guidance (official).",
            default=-1.0, min=-1.0, max=30.0, step=0.1),
         In("seed", "INT", RESIDUAL_SEED_TIP, default=-1, min=-1, max=MAX_SEED, control_after_generate=False),
         In("preview", "BOOLEAN", "Show the finished latent (discrete + residual) as a cheap preview on the node.",
            default=True, optional=True)],
        [Out(HART_TOKENS, "tokens", "Tokens with the residual.")],
        residual_diffusion,
        search_aliases=("hart residual", "hart refine", "hart detail"),
    ),
    NodeSpec(
        "HARTGenerate", "HART Generate",
        "Text to image in one node (HARTPipeline).",
        [MODEL_IN, In("prompt", "STRING", "The text prompt.", default="", multiline=True),
         In("negative_prompt", "STRING", "Optional negative prompt; empty = the official all-zero condition.",
            default="", multiline=True),
         In("seed", "INT", SEED_TIP, default=0, min=0, max=MAX_SEED, control_after_generate=True),
         In("size", "COMBO", SIZE_TIP + " auto = the model's own.", default=AUTO_SIZE, options=size_options),
         In("steps", "INT", "Residual diffusion steps (official 8).", default=8, min=2, max=1000),
         In("guidance", "FLOAT", GUIDANCE_TIP, default=4.5, min=0.0, max=30.0, step=0.1),
         In("batch_size", "INT", "Images per prompt.", default=1, min=1, max=64),
         In("preview", "BOOLEAN", PREVIEW_TIP, default=True, optional=True)],
        [Out("IMAGE", "image", "The generated images.")],
        generate,
        search_aliases=("hart text to image", "hart txt2img", "hart pipeline"),
    ),
]

NODE_SPECS.append(NodeSpec(
    "HARTLoraLoader", "HART LoRA Loader",
    "Apply a HART LoRA (the trainer's --lora_rank output, diffusers' key format) to the transformer and the residual "
    "head; chain loaders to combine adapters.",
    [MODEL_IN,
     In("lora_name", "COMBO", "A .safetensors LoRA file in ComfyUI/models/loras (or $HART_LORAS_DIR).",
        options=runtime.list_loras),
     In("strength", "FLOAT", "Adapter weight: 1 = as trained, 0 = off, negative values invert it.", default=1.0,
        min=-10.0, max=10.0, step=0.05)],
    [Out(HART_MODEL, "model", "The model with the adapter active (the input model keeps its own adapters).")],
    load_lora,
    search_aliases=("hart lora", "lora loader hart", "hart adapter"),
))

_EDIT_IN = [
    In("seed", "INT", SEED_TIP, default=0, min=0, max=MAX_SEED, control_after_generate=True),
    In("guidance", "FLOAT", GUIDANCE_TIP, default=4.5, min=0.0, max=30.0, step=0.1),
]
_EDIT_OPTIONAL = [
    In("negative", HART_CONDITIONING, "Optional negative conditioning; unconnected = the official all-zero condition.",
       optional=True),
    MASKGIT_IN,
    In("preview", "BOOLEAN", PREVIEW_TIP, default=True, optional=True),
]
NODE_SPECS += [
    NodeSpec(
        "HARTVariation", "HART Variation",
        "Image to image: keep the image's coarse scales (its hybrid tokens), re-sample the fine ones under the prompt "
        "(edit_tokens, as HARTImg2ImgPipeline). Feed the result to HART Residual Diffusion (seed -1).",
        [MODEL_IN, In("positive", HART_CONDITIONING, "The prompt's conditioning."),
         In("image", "IMAGE", "The image to vary; centre-cropped and resized to the model's size."), *_EDIT_IN,
         In("strength", "FLOAT", "The last int(strength x scales) scales are re-sampled: 0 = the image's "
            "reconstruction, 1 = text to image.", default=0.6, min=0.0, max=1.0, step=0.01),
         In("batch_size", "INT", "Variations per prompt.", default=1, min=1, max=64), *_EDIT_OPTIONAL],
        [Out(HART_TOKENS, "tokens", "Tokens (the image's where kept), the residual condition and the generator state.")],
        variation,
        search_aliases=("hart img2img", "hart image to image", "hart variations"),
    ),
    NodeSpec(
        "HARTInpaint", "HART Inpaint",
        "Repaint the masked part of an image (outpainting: pad the image and mask the border): tokens outside the "
        "mask are the image's at every scale, inside sampled (edit_tokens, as HARTInpaintPipeline). Feed the result "
        "to HART Residual Diffusion (seed -1), which re-samples the residual inside the mask only.",
        [MODEL_IN, In("positive", HART_CONDITIONING, "The prompt's conditioning."),
         In("image", "IMAGE", "The image; centre-cropped and resized to the model's size."),
         In("mask", "MASK", "Same size as the image; 1 (white) = repaint, binarised at 0.5."), *_EDIT_IN,
         In("strength", "FLOAT", "Inside the mask the last int(strength x scales) scales are sampled, the first ones "
            "kept (1 = repaint from scratch).", default=1.0, min=0.0, max=1.0, step=0.01),
         In("batch_size", "INT", "Results per prompt.", default=1, min=1, max=64), *_EDIT_OPTIONAL],
        [Out(HART_TOKENS, "tokens", "Tokens (the image's outside the mask), the residual condition and the generator "
             "state.")],
        inpaint,
        search_aliases=("hart inpainting", "hart outpainting", "hart repaint"),
    ),
]

SPECS_BY_ID = {s.node_id: s for s in NODE_SPECS}
