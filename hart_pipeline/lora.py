"""LoRA adapters for HART: load, save, combine, fuse and remove them on a :class:`HARTPipeline`.

Both trainable components take PEFT adapters (``PeftAdapterMixin``): the transformer and the residual
head. A LoRA file is one safetensors state dict in diffusers' key format: PEFT keys prefixed with the
component name (``transformer.blocks.0.attn.qkv_proj.lora_A.weight``,
``residual_head.res_blocks.0.mlp.0.lora_B.weight``), with each component's ``LoraConfig`` in the
safetensors metadata so rank and alpha round-trip. ``set_adapters``, ``fuse_lora``, ``unfuse_lora``,
``unload_lora_weights``, ``delete_adapters``, ``disable_lora`` / ``enable_lora`` come from diffusers'
``LoraBaseMixin`` and act on both components.
"""

import os
from typing import Callable, Dict, List, Optional, Union

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import is_peft_available

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_REQUIREMENT = "peft>=0.15"  # as in pyproject.toml


def require_peft(what: str) -> None:
    """PEFT is needed only once a LoRA is used: say what to install instead of diffusers' bare error."""
    if not is_peft_available():
        raise ImportError(f"{what} needs PEFT, which is not installed: pip install '{PEFT_REQUIREMENT}' "
                          "(generation without a LoRA does not need it).")

# Default LoRA targets (PEFT suffix match): every linear layer of the attention and the SwiGLU MLP of each
# transformer block; the two linears of every residual block of the head.
TRANSFORMER_LORA_TARGETS = ("attn.qkv_proj", "attn.proj", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")
RESIDUAL_HEAD_LORA_TARGETS = ("mlp.0", "mlp.2")


class HARTLoraLoaderMixin(LoraBaseMixin):
    """Load LoRA layers into :class:`HARTTransformer` and :class:`HARTResidualHead` of a :class:`HARTPipeline`."""

    _lora_loadable_modules = ["transformer", "residual_head"]
    transformer_name = "transformer"
    residual_head_name = "residual_head"

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
                        return_lora_metadata: bool = False, **kwargs):
        """The LoRA state dict (and its metadata) from a folder, a ``.safetensors`` file, a Hub repo id or a dict.

        Only safetensors are read (no pickle). Keyword arguments as in diffusers (``weight_name``,
        ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``...).
        """
        path = pretrained_model_name_or_path_or_dict
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            if not str(path).endswith(".safetensors"):
                raise ValueError(f"LoRA file {path} is not a .safetensors file; only safetensors LoRA files are loaded.")
            kwargs["weight_name"], path = os.path.basename(path), os.path.dirname(os.path.abspath(path))
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: HART LoRA files are only read from safetensors (never unpickled).")
        options = {k: kwargs.pop(k, None) for k in ("weight_name", "local_files_only", "cache_dir", "force_download",
                                                      "proxies", "token", "revision", "subfolder")}
        options["force_download"] = bool(options["force_download"])
        if kwargs:
            raise TypeError(f"lora_state_dict got unexpected keyword arguments {sorted(kwargs)}.")
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=path, use_safetensors=True, allow_pickle=False,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, **options,
        )
        prefixes = tuple(f"{name}." for name in cls._lora_loadable_modules)
        unknown = [k for k in state_dict if not k.startswith(prefixes) or "lora" not in k]
        if unknown:
            raise ValueError(
                f"Not a HART LoRA state dict: keys {unknown[:3]} do not start with one of {list(prefixes)} or hold "
                "no 'lora' weight. Save LoRA layers with HARTPipeline.save_lora_weights."
            )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
                          adapter_name: Optional[str] = None, hotswap: bool = False, **kwargs) -> None:
        """Load a LoRA (folder, ``.safetensors`` file, Hub repo id or state dict) into the transformer and/or the
        residual head, as adapter ``adapter_name`` (default ``default_{i}``)."""
        require_peft("load_lora_weights")
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, return_lora_metadata=True,
                                                    **kwargs)
        for name in self._lora_loadable_modules:
            if any(k.startswith(f"{name}.") for k in state_dict):
                getattr(self, name).load_lora_adapter(
                    state_dict, prefix=name, adapter_name=adapter_name, metadata=metadata, _pipeline=self,
                    low_cpu_mem_usage=low_cpu_mem_usage, hotswap=hotswap,
                )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        transformer_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        residual_head_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function: Optional[Callable] = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: Optional[dict] = None,
        residual_head_lora_adapter_metadata: Optional[dict] = None,
    ) -> None:
        """Write ``pytorch_lora_weights.safetensors`` from PEFT state dicts of the components
        (``peft.get_peft_model_state_dict(component)``) and their ``LoraConfig.to_dict()`` metadata."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: HART LoRA files are safetensors only.")
        layers, metadata = {}, {}
        for name, lora, meta in ((cls.transformer_name, transformer_lora_layers, transformer_lora_adapter_metadata),
                                 (cls.residual_head_name, residual_head_lora_layers, residual_head_lora_adapter_metadata)):
            if lora:
                layers[name], metadata[name] = lora, meta
        if not layers:
            raise ValueError("Pass transformer_lora_layers and/or residual_head_lora_layers.")
        cls._save_lora_weights(save_directory=save_directory, lora_layers=layers, lora_metadata=metadata,
                               is_main_process=is_main_process, weight_name=weight_name or LORA_WEIGHT_NAME,
                               save_function=save_function, safe_serialization=True)

    def _adapter_holders(self, components: List[str]) -> List[str]:
        """Those of ``components`` that hold a LoRA adapter."""
        return [c for c in components if getattr(getattr(self, c, None), "peft_config", None)]

    def _has_adapters(self) -> bool:
        return bool(self._adapter_holders(self._lora_loadable_modules))

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """{component: its adapter names}; ``{}`` when no adapter is loaded (then PEFT is not needed)."""
        return super().get_list_adapters() if self._has_adapters() else {}

    def get_active_adapters(self) -> List[str]:
        """The active adapters' names; ``[]`` when no adapter is loaded (then PEFT is not needed)."""
        return super().get_active_adapters() if self._has_adapters() else []

    def _components_with_adapters(self, components: List[str], action: str) -> List[str]:
        """The ``components`` that hold a LoRA adapter (a component without one is left alone), or a clear
        error when none of them does."""
        unknown = [c for c in components if c not in self._lora_loadable_modules]
        if unknown:
            raise ValueError(f"{action}: components {unknown} take no LoRA; choose from {self._lora_loadable_modules}.")
        found = self._adapter_holders(components)
        if not found:
            raise ValueError(f"{action}: no LoRA adapter is loaded in {list(components)}; "
                             "call pipe.load_lora_weights(...) first.")
        return found

    def fuse_lora(self, components: List[str] = ("transformer", "residual_head"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: Optional[List[str]] = None, **kwargs) -> None:
        """Merge the active adapters (scaled by ``lora_scale``) into the base weights of those ``components``
        that hold an adapter (an adapter may cover only the transformer or only the residual head)."""
        super().fuse_lora(components=self._components_with_adapters(list(components), "fuse_lora"),
                          lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs)

    def unfuse_lora(self, components: List[str] = ("transformer", "residual_head"), **kwargs) -> None:
        """Subtract fused adapters from the base weights again (the adapters stay loaded)."""
        super().unfuse_lora(components=self._components_with_adapters(list(components), "unfuse_lora"), **kwargs)


def lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """The PEFT state dict of one adapter of a component (what :meth:`save_lora_weights` takes)."""
    require_peft("lora_layers")
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def lora_metadata(model: torch.nn.Module, adapter_name: str = "default") -> dict:
    """The ``LoraConfig`` of one adapter as a JSON-able dict (saved next to the weights)."""
    return model.peft_config[adapter_name].to_dict()


__all__ = ["HARTLoraLoaderMixin", "LORA_WEIGHT_NAME", "PEFT_REQUIREMENT", "RESIDUAL_HEAD_LORA_TARGETS",
           "TRANSFORMER_LORA_TARGETS", "lora_layers", "lora_metadata", "require_peft"]
