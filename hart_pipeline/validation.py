"""Input validation: every bad argument becomes a ``ValueError`` that names it and says how to fix it.

One set of small checkers (numbers, tensors, devices, dtypes, configs) used by the pipeline's
``check_inputs``, the model constructors (their configs), the loader, the converter and the CLI, so a
wrong value fails where it enters instead of deep inside torch or as a silently wrong image.
Integers accept Python, numpy and 0-d torch integers (never bools); real numbers accept ints and
floats of those kinds (never bools, tensors with more than one element, NaN or infinities).
"""

import json
import math
import numbers
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

DTYPE_NAMES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _scalar(value: Any) -> Any:
    """A 0-d torch tensor or numpy array -> its Python number; anything else unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None,
              hint: str = "") -> int:
    """``value`` as a Python int in ``[minimum, maximum]``; bools, floats and strings are refused."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer{_range(minimum, maximum)}; got {_describe(value)}.{hint}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be an integer{_range(minimum, maximum)}; got {value}.{hint}")
    return value


def check_float(name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None,
                below_maximum: bool = False, hint: str = "") -> float:
    """``value`` as a finite Python float in ``[minimum, maximum]`` (``maximum`` excluded with ``below_maximum``)."""
    value = _scalar(value)
    span = _range(minimum, maximum, below_maximum)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number{span}; got {_describe(value)}.{hint}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number{span}; got {value}.{hint}")
    if (minimum is not None and value < minimum) or (maximum is not None and (
            value >= maximum if below_maximum else value > maximum)):
        raise ValueError(f"`{name}` must be a real number{span}; got {value}.{hint}")
    return value


def check_residual_guidance(name: str, value: Any) -> Optional[float]:
    """A residual-stage guidance: None (the default chain of :func:`hart_pipeline.sampling.add_residual`) or a real >= 0."""
    if value is None:
        return None
    return check_float(name, value, 0.0, hint=" 0 = no guidance (the conditional prediction alone); None = the "
                                               "default: the scheduler's guidance_scale, else the AR stage's final-scale "
                                               "guidance (official).")


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {_describe(value)}.")
    return bool(value)


def _range(minimum, maximum, below_maximum: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}{')' if below_maximum else ']'}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" {'<' if below_maximum else '<='} {maximum}"
    return ""


def read_json_object(path: str) -> dict:
    """The JSON object in the file ``path``; invalid JSON or another JSON type is a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got a {type(data).__name__}.")
    return data


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {_describe(value)}.")
    return value


def check_tensor(name: str, value: Any, ndim: int, floating: bool = True, finite: bool = True, hint: str = "") -> torch.Tensor:
    """A torch tensor of ``ndim`` non-empty dimensions (floating and finite by default)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor with {ndim} dimensions; got {type(value).__name__}.{hint}")
    if value.ndim != ndim or 0 in value.shape:
        raise ValueError(f"`{name}` must have {ndim} non-empty dimensions; got shape {tuple(value.shape)}.{hint}")
    if floating and not value.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor; got {value.dtype}.{hint}")
    if finite and floating and not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values.{hint}")
    return value


def check_mask(name: str, mask: Any, shape: Tuple[int, ...]) -> torch.Tensor:
    """An attention mask of ``shape`` holding only 0 and 1, with at least one 1 per row."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape {shape}; got {type(mask).__name__}.")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)} (batch, tokens of the embeddings); "
                         f"got {tuple(mask.shape)}.")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"`{name}` must hold only 0 (padding) and 1 (token).")
    if not bool((mask != 0).any(dim=1).all()):
        raise ValueError(f"`{name}` has a row without any token (all zeros); every row needs at least one 1.")
    return mask


def check_device(name: str, device: Any) -> torch.device:
    """A device this torch build can run on (``cuda`` on a CPU-only torch is refused with the fix)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`{name}`: {_describe(device)} is not a device; use 'cpu', 'cuda', 'cuda:1', 'mps' ...") from None
    if device.type == "meta":
        raise ValueError(f"`{name}`: the meta device holds no data; use 'cpu' or an accelerator.")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = torch.backends.mps.is_available if device.type == "mps" else getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"`{name}`: {str(device)!r} is not available: this torch build ({torch.__version__}) has no "
                         f"{device.type} device; use 'cpu' or install a torch with {device.type} support.")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"`{name}`: {str(device)!r} does not exist; only {count()} {device.type} device(s) are visible.")
    return device


def check_dtype(name: str, dtype: Any) -> torch.dtype:
    """A floating torch dtype, or one of the names in :data:`DTYPE_NAMES`."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2:
        return dtype
    raise ValueError(f"`{name}` must be a floating torch dtype (torch.float32, torch.bfloat16, torch.float16) or one of "
                     f"{sorted(DTYPE_NAMES)}; got {_describe(dtype)}.")


def check_generator(generator: Any) -> Optional[torch.Generator]:
    """None, a ``torch.Generator`` or a list holding exactly one (HART draws a batch from one stream)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1 or not isinstance(generator[0], torch.Generator):
            raise ValueError("`generator` must be one torch.Generator (HART draws every image of a batch from one "
                             f"stream); got a {type(generator).__name__} of {len(generator)} "
                             f"{', '.join(sorted({type(g).__name__ for g in generator})) or 'items'}.")
        return generator[0]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator, e.g. torch.Generator().manual_seed(0); got "
                         f"{_describe(generator)}.")
    return generator


# --------------------------------------------------------------------------------------------- pipeline
MAX_IMAGES_PER_PROMPT = 1024  # beyond this a call only exhausts memory (the KV cache holds every image)
MAX_TEXT_TOKENS = 1 << 16  # text length bound when neither the tokenizer nor the text encoder states one
class CallArguments(NamedTuple):
    """The scalar arguments of ``HARTPipeline.__call__`` after validation, as plain Python values."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    top_k: Optional[int]
    top_p: float
    num_images_per_prompt: int
    generator: Optional[torch.Generator]
    max_sequence_length: Optional[int]
    residual_guidance_scale: Optional[float] = None


def check_prompts(name: str, prompt: Any, allow_none: bool) -> Optional[int]:
    """Number of prompts in ``prompt`` (a string or a non-empty list of strings)."""
    if prompt is None and allow_none:
        return None
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ValueError(f"`{name}` must be a string or a non-empty list of strings; got {_describe(prompt)}.")


def check_call_arguments(
    pipe,
    prompt,
    negative_prompt,
    height,
    width,
    num_inference_steps,
    guidance_scale,
    top_k,
    top_p,
    num_images_per_prompt,
    prompt_embeds,
    prompt_attention_mask,
    negative_prompt_embeds,
    negative_prompt_attention_mask,
    output_type,
    callback_on_step_end,
    callback_on_step_end_tensor_inputs,
    generator=None,
    smooth=True,
    return_dict=True,
    max_sequence_length=None,
    output_types: Sequence[str] = (),
    residual_guidance_scale=None,
) -> CallArguments:
    """Validate every argument of ``HARTPipeline.__call__``; return the scalars as plain Python values."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of `prompt` or `prompt_embeds`.")
    context_dim = pipe.transformer.config.context_dim
    if max_sequence_length is not None:
        limits = [getattr(pipe.tokenizer, "model_max_length", None),
                  getattr(getattr(pipe.text_encoder, "config", None), "max_position_embeddings", None)]
        limit = min([n for n in limits if isinstance(n, int) and n < 1_000_000] or [MAX_TEXT_TOKENS])
        max_sequence_length = check_int("max_sequence_length", max_sequence_length, 1, limit,
                                        hint=" It is the number of text tokens (None = the transformer's context_tokens).")
    if prompt is not None:
        batch = check_prompts("prompt", prompt, allow_none=False)
        tokens = max_sequence_length or pipe.transformer.config.context_tokens
    else:
        embeds_hint = f" Pass text-encoder hidden states shaped (batch, tokens, {context_dim})."
        check_tensor("prompt_embeds", prompt_embeds, 3, hint=embeds_hint)
        batch, tokens = prompt_embeds.shape[:2]
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is None:
            continue
        check_tensor(name, embeds, 3, hint=f" Pass text-encoder hidden states shaped (batch, tokens, {context_dim}).")
        if embeds.shape[-1] != context_dim:
            raise ValueError(
                f"`{name}` must be (batch, tokens, {context_dim}) for this transformer (context_dim={context_dim}); "
                f"got {tuple(embeds.shape)}. Encode with the text encoder the model was trained with."
            )
        if embeds.shape[:2] != (batch, tokens):
            raise ValueError(f"`{name}` must be ({batch}, {tokens}, {context_dim}) to match the prompts "
                             f"({batch} prompts of {tokens} text tokens); got {tuple(embeds.shape)}.")
    for name, mask, embeds in (("prompt_attention_mask", prompt_attention_mask, prompt_embeds),
                               ("negative_prompt_attention_mask", negative_prompt_attention_mask, negative_prompt_embeds)):
        if mask is not None and embeds is None:
            raise ValueError(f"`{name}` is only used with `{name.replace('attention_mask', 'embeds')}`; pass both or neither.")
        if mask is not None:
            check_mask(name, mask, tuple(embeds.shape[:2]))
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass at most one of `negative_prompt` or `negative_prompt_embeds`.")
    negatives = check_prompts("negative_prompt", negative_prompt, allow_none=True)
    if not isinstance(negative_prompt, str) and negatives is not None and negatives != batch:
        raise ValueError(
            f"`negative_prompt` has {negatives} entries but there are {batch} prompts; pass one negative "
            "prompt per prompt, or a single string for all."
        )

    default = pipe.default_size
    height = default if height is None else check_int("height", height, 1)
    width = default if width is None else check_int("width", width, 1)
    pipe.patch_nums_for_size(height, width)
    max_steps = pipe.scheduler.config.num_train_timesteps
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, 2, max_steps,
                                    hint=" It counts the residual diffusion steps (official 8).")
    guidance_scale = check_float("guidance_scale", guidance_scale, 0.0,
                                 hint=" 0 disables guidance; the official value is 4.5.")
    if top_k is not None:
        top_k = check_int("top_k", top_k, 0, hint=" 0 disables top-k; None = the official 600/300 schedule.")
    top_p = check_float("top_p", top_p, 0.0, 1.0, below_maximum=True, hint=" 0 disables nucleus sampling.")
    num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, 1, MAX_IMAGES_PER_PROMPT,
                                      hint=" For more images, call the pipeline several times.")
    check_bool("smooth", smooth)
    check_bool("return_dict", return_dict)
    check_choice("output_type", output_type, output_types)
    generator = check_generator(generator)

    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError("`callback_on_step_end` must be callable as fn(pipe, step, timestep, callback_kwargs) -> dict; "
                         f"got {_describe(callback_on_step_end)}.")
    if callback_on_step_end_tensor_inputs is not None:
        names = callback_on_step_end_tensor_inputs
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError("`callback_on_step_end_tensor_inputs` must be a list of names, e.g. ['latents']; "
                             f"got {_describe(names)}.")
        unknown = set(names) - set(pipe._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {sorted(unknown)} are not among "
                             f"{pipe._callback_tensor_inputs}.")
    residual_guidance_scale = check_residual_guidance("residual_guidance_scale", residual_guidance_scale)
    return CallArguments(height, width, num_inference_steps, guidance_scale, top_k, top_p, num_images_per_prompt,
                         generator, max_sequence_length, residual_guidance_scale)


def check_callback_output(output: Any, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What ``callback_on_step_end`` returned: None or a dict whose tensors keep the shapes they were given."""
    if output is None:
        return {}
    if not isinstance(output, dict):
        raise ValueError(f"`callback_on_step_end` must return a dict (e.g. the callback_kwargs it was given) or None; "
                         f"got {_describe(output)}.")
    for key, value in output.items():
        if key not in tensors:
            continue
        reference = tensors[key]
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"`callback_on_step_end` returned {key!r} as {shape}; it must keep the shape "
                             f"{tuple(reference.shape)}.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`callback_on_step_end` returned {key!r} with NaN or infinite values.")
    return output


def check_finite_output(name: str, values: torch.Tensor) -> torch.Tensor:
    """Generated ``values`` must be finite: NaN/inf (weights that overflow, e.g. a damaged but finite file, or
    float16 overflow) is an error, never an image."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"The generated {name} contain NaN or infinite values ({values.dtype}): the model's weights "
                         "overflow. Load the model in float32 and check its weight files.")
    return values


# --------------------------------------------------------------------------------------------- configs
ConfigRule = Callable[[str, Any], Any]


def positive_int(maximum: int) -> ConfigRule:
    return lambda name, value: check_int(name, value, 1, maximum)


def real(minimum: Optional[float] = None, maximum: Optional[float] = None, below_maximum: bool = False) -> ConfigRule:
    return lambda name, value: check_float(name, value, minimum, maximum, below_maximum)


def positive_real(maximum: Optional[float] = None) -> ConfigRule:
    def rule(name: str, value: Any) -> float:
        value = check_float(name, value, 0.0, maximum)
        if value == 0:
            raise ValueError(f"`{name}` must be > 0; got 0.")
        return value

    return rule


def int_list(minimum: int, maximum: int, increasing: bool = False) -> ConfigRule:
    """A non-empty list/tuple of ints in ``[minimum, maximum]`` (strictly increasing when asked)."""

    def rule(name: str, value: Any) -> Tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ValueError(f"`{name}` must be a non-empty list of integers; got {_describe(value)}.")
        values = tuple(check_int(f"{name}[{i}]", v, minimum, maximum) for i, v in enumerate(value))
        if increasing and any(a >= b for a, b in zip(values, values[1:])):
            raise ValueError(f"`{name}` must be strictly increasing; got {list(values)}.")
        return values

    return rule


def boolean(name: str, value: Any) -> bool:
    return check_bool(name, value)


def check_config(component: str, values: Dict[str, Any], rules: Dict[str, ConfigRule]) -> None:
    """Validate a model's config; a ValueError names the component and the field (``HARTTransformer.embed_dim``)."""
    for field, rule in rules.items():
        try:
            rule(field, values[field])
        except ValueError as e:
            raise ValueError(f"{component} config: {e} Fix `{field}` (constructor argument / config.json field).") from None


__all__ = [
    "CallArguments", "DTYPE_NAMES", "check_bool", "check_call_arguments", "check_callback_output", "check_choice",
    "check_config", "check_device", "check_dtype", "check_finite_output", "check_float", "check_generator", "check_int", "check_mask",
    "check_residual_guidance", "check_tensor",
]
