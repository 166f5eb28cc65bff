"""Strict loading of HART's own components: a bad folder fails at load time, naming the component and the key.

:class:`StrictLoadingMixin` wraps ``ModelMixin.from_pretrained`` for :class:`HARTTransformer`,
:class:`HARTResidualHead` and :class:`HARTHybridTokenizer`, so every path that loads them
(``HARTPipeline.from_pretrained``, ``DiffusionPipeline.from_pretrained``, the model classes directly)
refuses, instead of warning and producing a NaN image later:

* a config written for another class, or missing one of the architecture fields (a silent default
  such as the 1024px ``patch_nums`` would not fit the weights); field types and ranges are checked
  by the constructors (:func:`~hart_pipeline.validation.check_config`);
* unreadable or truncated weight files (the error names the file), tensors that are not floating point;
* missing, unexpected or wrongly shaped tensors;
* weights that are NaN or infinite.
"""

import os
from typing import Any, Dict, Iterable, List, Optional

import torch
from safetensors import SafetensorError, safe_open

from .validation import read_json_object

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class ComponentLoadError(ValueError):
    """A component folder cannot be loaded as it is; the message names the component, the file and the key."""


def _shown(keys: List[str], limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _weight_files(folder: str, variant: Optional[str]) -> List[str]:
    """The safetensors files of a local component folder (a single file or the shards of an index)."""
    if not os.path.isdir(folder):
        return []
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in WEIGHT_NAMES:
        single = os.path.join(folder, stem + suffix)
        if os.path.isfile(single):
            return [single]
        index = os.path.join(folder, stem + suffix + ".index.json")
        if os.path.isfile(index):
            try:
                shards = sorted(set(read_json_object(index)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ComponentLoadError(f"{index} is not a valid safetensors index: {e}") from None
            return [os.path.join(folder, shard) for shard in shards]
    return []


def check_weight_files(component: str, files: List[str], floating_only: bool = True) -> None:
    """Open every file's header (cheap): an unreadable file, or (``floating_only``) a non-floating tensor, names
    the file and the key."""
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ComponentLoadError(f"{component}: the weight file {path} cannot be read ({e}); it is truncated or "
                                     "corrupt: save or download it again.") from None
        wrong = {k: v for k, v in dtypes.items() if v not in FLOAT_DTYPES} if floating_only else {}
        if wrong:
            items = ", ".join(f"{k} ({v})" for k, v in sorted(wrong.items())[:10])
            raise ComponentLoadError(f"{component}: {path} holds non-floating-point tensors: {items}; HART weights are "
                                     "float32/bfloat16/float16. The file does not belong to this component.")


def check_pipeline_folder(path: str, components: Iterable[str]) -> None:
    """Before loading a local pipeline folder: every component's JSON file parses and every safetensors header
    reads, so a garbage ``tokenizer.json`` or a truncated text encoder fails naming the file."""
    for name in components:
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            full = os.path.join(folder, file)
            if file.endswith(".json"):
                try:
                    read_json_object(full)
                except ValueError as e:
                    raise ComponentLoadError(f"`{name}`: {e} Restore the file.") from None
            elif file.endswith(".safetensors"):
                check_weight_files(f"`{name}`", [full], floating_only=False)


def check_finite(component: str, model: torch.nn.Module) -> None:
    """Every parameter and buffer is finite (a corrupted file often decodes to NaN or inf).

    Quantized weights (tensor subclasses of a quantization backend, e.g. torchao's Int8Tensor) are not
    plain tensors and are left out."""
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if type(t.data) is torch.Tensor and t.is_floating_point() and t.device.type != "meta"
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise ComponentLoadError(f"{component}: the weights {_shown(bad)} contain NaN or infinite values; the weight "
                                 "file is corrupt or was saved from a diverged model.")


class StrictLoadingMixin:
    """``from_pretrained`` that refuses a wrong config, unreadable/missing/extra/non-finite weights (see module doc).

    Mix in before ``ModelMixin``; ``_config_rules`` lists the architecture fields the config must state.
    """

    _config_rules: Dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder) if subfolder else str(pretrained_model_name_or_path)
        component = f"{cls.__name__} ({folder})"
        config_kwargs = {k: kwargs[k] for k in ("subfolder", "cache_dir", "force_download", "local_files_only",
                                                 "token", "revision", "proxies") if k in kwargs}
        try:
            config = cls.load_config(pretrained_model_name_or_path, **config_kwargs)
        except EnvironmentError as e:
            raise ComponentLoadError(f"{component}: {e}") from None
        if not isinstance(config, dict):
            raise ComponentLoadError(f"{component}: config.json must hold a JSON object; got {type(config).__name__}.")
        class_name = config.get("_class_name")
        if class_name is not None and class_name != cls.__name__:
            raise ComponentLoadError(f"{component}: config.json describes a {class_name}, not a {cls.__name__}; the "
                                     "folder holds another component (check model_index.json and the subfolders).")
        missing = [field for field in cls._config_rules if field not in config]
        if missing:
            raise ComponentLoadError(f"{component}: config.json lacks {_shown(missing)}; a default would not fit the "
                                     "weights. Add the field(s) from the model's training/conversion config.")

        files = _weight_files(folder, kwargs.get("variant"))
        check_weight_files(component, files)  # local folders; Hub files get the key and finiteness checks
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except (SafetensorError, ValueError) as e:  # diffusers' shape errors do not name the component
            raise ComponentLoadError(f"{component}: {e}") from None
        except OSError as e:
            if files:  # the file exists, so it could not be read
                raise ComponentLoadError(f"{component}: {e}") from None
            raise
        problems = []
        for title, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                            ("wrong shape", [str(k) for k in info["mismatched_keys"]])):
            if keys:
                problems.append(f"{title}: {_shown(keys)}")
        if problems:
            raise ComponentLoadError(f"{component}: the weights do not match the config ({'; '.join(problems)}). "
                                     "The weight file belongs to another model or component.")
        check_finite(component, model)
        return (model, info) if want_info else model


__all__ = ["ComponentLoadError", "StrictLoadingMixin", "check_finite", "check_pipeline_folder", "check_weight_files"]
