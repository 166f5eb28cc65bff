"""Convert the official HART checkpoint layout (``llm/`` + ``tokenizer/``) to diffusers components.

Usage::

    python -m hart_pipeline.convert path/to/hart-0.7b-1024px path/to/hart-diffusers [--no-ema]

The official ``llm/`` weights hold the transformer and the residual diffusion MLP (``diffloss.net.*``);
they are split into ``transformer/`` and ``residual_head/``. The official tokenizer becomes ``vae/``
(its discriminator and codebook-usage statistics are training-only and dropped).
"""

import argparse
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

from .models.residual_head import HARTResidualHead
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .scheduler import HARTResidualScheduler
from .validation import int_list, read_json_object


class CheckpointError(ValueError):
    """The folder is not an official HART checkpoint this converter supports; the message says why."""


# Official transformer flags that the released model uses; anything else is a different architecture.
REQUIRED_TRANSFORMER_FLAGS = {
    "attn_type": "llama",
    "mlp_type": "llama",
    "disable_aln": True,
    "shared_aln": False,
    "use_timestep_embed": True,
    "use_context_norm": True,
    "use_cross_attn": False,
}
# The official config class defaults, for flags an official config.json leaves out.
OFFICIAL_FLAG_DEFAULTS = {
    "attn_type": "gpt2",
    "mlp_type": "gpt2",
    "disable_aln": False,
    "shared_aln": False,
    "use_timestep_embed": False,
    "use_context_norm": False,
    "use_cross_attn": False,
}
DERIVED_TRANSFORMER_KEYS = ("lvl_1L", "attn_bias_for_masking")  # rebuilt from patch_nums at run time
TRAINING_ONLY_TOKENIZER_KEYS = ("quantize.ema_vocab_hit_SV",)


@dataclass
class HARTComponents:
    transformer: HARTTransformer
    residual_head: HARTResidualHead
    vae: HARTHybridTokenizer
    scheduler: HARTResidualScheduler


# Official config field -> our constructor argument, with the official defaults (the config class defaults).
TOKENIZER_FIELDS = {"z_channels": ("latent_channels", 32), "vocab_size": ("vocab_size", 4096), "ch": ("base_channels", 160),
                    "ch_mult": ("channel_multipliers", (1, 1, 2, 2, 4)), "quant_resi": ("quant_resi", 0.5),
                    "share_quant_resi": ("num_phi", 4)}
TRANSFORMER_FIELDS = {"embed_dim": ("embed_dim", 1024), "depth": ("num_layers", 16), "num_heads": ("num_heads", 16),
                      "mlp_ratio": ("mlp_ratio", 4.0), "norm_eps": ("norm_eps", 1e-6),
                      "context_token": ("context_tokens", 77), "context_dim": ("context_dim", 768),
                      "attn_l2_norm": ("attn_l2_norm", False)}  # cosine attention (scale_mul_1H11 keys): either way
HEAD_FIELDS = {"diff_width": ("width", 1024), "diff_depth": ("num_layers", 6)}
DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _read_config(folder: str, expected_types: Iterable[str]) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json; expected the official HART layout with llm/ and tokenizer/.")
    try:
        config = read_json_object(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in expected_types:
        raise CheckpointError(f"{path} has model_type {model_type!r}; expected one of {sorted(expected_types)}.")
    return config


def _build(cls, config_path: str, config: dict, fields: Dict[str, Tuple[str, object]], **extra):
    """``cls(**arguments)`` from the official ``config`` via ``fields``; a bad value names the official field."""
    arguments = {ours: config.get(theirs, default) for theirs, (ours, default) in fields.items()}
    try:
        return cls(**arguments, **extra)
    except ValueError as e:
        official = {ours: theirs for theirs, (ours, _) in fields.items()}
        named = [f"`{theirs}`" for ours, theirs in official.items() if f"`{ours}`" in str(e)]
        where = f" (official field {', '.join(named)})" if named else ""
        raise CheckpointError(f"{config_path}{where}: {e}") from None


def load_state_dict(folder: str, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Load the first of ``names`` present in ``folder``: safetensors directly, ``.bin`` with weights_only.

    The result must be a dict of tensors; a corrupt file is an error naming it (never a silent fallback).
    """
    names = list(names)
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(path)
            except (SafetensorError, OSError) as e:
                others = [n for n in names if n != name and os.path.isfile(os.path.join(folder, n))]
                hint = f" Delete or replace it (the converter would otherwise use {others[0]})." if others else ""
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}).{hint}") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickles with arbitrary objects are refused, not executed
                raise CheckpointError(f"{path} could not be loaded safely (weights_only=True): {e}") from e
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise CheckpointError(f"{path} must hold a state dict (parameter name -> tensor); got a "
                                  f"{type(state).__name__}.")
        return state
    raise CheckpointError(f"{folder} contains none of {names}.")


def _check_keys(name: str, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    not_float = sorted(f"{k} ({state[k].dtype})" for k in floats & set(state) if not state[k].is_floating_point())
    if missing or unexpected or wrong or not_float:
        lines = [f"The {name} weights do not match its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                             ("not floating point (a damaged or foreign checkpoint)", not_float)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))


def map_official_tokenizer_state(raw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official tokenizer keys (``vae.*`` [+ ``disc.*``]) -> :class:`HARTHybridTokenizer` keys."""
    state = {}
    for key, value in raw.items():
        if key.startswith("disc."):
            continue  # the GAN discriminator only matters for tokenizer training
        key = key[len("vae."):] if key.startswith("vae.") else key
        if key in TRAINING_ONLY_TOKENIZER_KEYS:
            continue
        key = key.replace("quantize.quant_resi.qresi_ls.", "quantizer.phis.").replace("quantize.embedding.", "quantizer.embedding.")
        state[key] = value
    return state


def split_official_transformer_state(raw: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Official ``llm`` keys -> (:class:`HARTTransformer` keys, :class:`HARTResidualHead` keys).

    The derived buffers (level ids, training attention bias, the all-zero k bias) are dropped.
    """
    trunk, head = {}, {}
    for key, value in raw.items():
        if key.startswith("diffloss.net."):
            head[key[len("diffloss.net."):]] = value
        elif key not in DERIVED_TRANSFORMER_KEYS and not key.endswith(".attn.zero_k_bias"):
            trunk[key] = value
    return trunk, head


def _locate(src: str) -> Tuple[str, str]:
    """(llm folder, tokenizer folder) of an official checkpoint root or of its ``llm`` folder."""
    src = os.path.abspath(src.rstrip("/"))
    if os.path.isdir(os.path.join(src, "llm")):
        llm = os.path.join(src, "llm")
    elif os.path.isfile(os.path.join(src, "config.json")):
        llm = src
    else:
        raise CheckpointError(f"{src} is not an official HART checkpoint: expected a folder with llm/ and tokenizer/.")
    config = _read_config(llm, {"hart_transformer_t2i"})
    vae_path = config.get("vae_path")
    if vae_path is not None and not (isinstance(vae_path, str) and vae_path.strip()):
        raise CheckpointError(f"{os.path.join(llm, 'config.json')}: vae_path must be a folder path or null (the "
                              f"tokenizer/ folder beside llm/); got {vae_path!r}.")
    tokenizer = vae_path or os.path.join(os.path.dirname(llm), "tokenizer")
    if not os.path.isdir(tokenizer):
        raise CheckpointError(f"The tokenizer folder {tokenizer} of {llm} does not exist.")
    return llm, tokenizer


def convert_tokenizer(folder: str, patch_nums: Tuple[int, ...]) -> HARTHybridTokenizer:
    config = _read_config(folder, {"hart_autoencoder_with_disc", "hart_autoencoder"})
    if config.get("quantizer_type") != "var_hybrid":
        raise CheckpointError(f"{folder}: quantizer_type {config.get('quantizer_type')!r} is not HART's 'var_hybrid'.")
    if config.get("using_znorm", False) or config.get("quant_conv_ks", 3) != 3 or not (
            isinstance(config.get("share_quant_resi", 4), int) and config.get("share_quant_resi", 4) >= 2):
        raise CheckpointError(f"{folder}: only using_znorm=False, quant_conv_ks=3 and share_quant_resi>=2 are supported.")
    model = _build(HARTHybridTokenizer, os.path.join(folder, "config.json"), config, TOKENIZER_FIELDS,
                   patch_nums=patch_nums)
    state = map_official_tokenizer_state(load_state_dict(folder, ["model.safetensors", "pytorch_model.bin"]))
    _check_keys("tokenizer", model, state)
    model.load_state_dict(state)
    return model


def convert_official(src: str, ema: bool = True) -> HARTComponents:
    """Build the diffusers components from an official checkpoint folder (in memory)."""
    llm, tokenizer_folder = _locate(src)
    config = _read_config(llm, {"hart_transformer_t2i"})
    flags = {k: config.get(k, OFFICIAL_FLAG_DEFAULTS[k]) for k in REQUIRED_TRANSFORMER_FLAGS}
    wrong = {k: v for k, v in flags.items() if v != REQUIRED_TRANSFORMER_FLAGS[k]}
    if wrong:
        raise CheckpointError(f"{llm}: unsupported architecture flags {wrong}; HART needs {REQUIRED_TRANSFORMER_FLAGS}.")
    if config.get("sampler", "iddpm") != "iddpm":
        raise CheckpointError(f"{llm}: residual sampler {config['sampler']!r} is not supported (only 'iddpm').")
    config_path = os.path.join(llm, "config.json")
    patch_nums = config.get("patch_nums", DEFAULT_PATCH_NUMS)
    try:
        patch_nums = int_list(1, 1024, increasing=True)("patch_nums", patch_nums)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    vae = convert_tokenizer(tokenizer_folder, patch_nums)

    names = ["ema_model.safetensors", "ema_model.bin"] if ema else ["model.safetensors", "pytorch_model.bin"]
    raw = load_state_dict(llm, names)
    transformer = _build(HARTTransformer, config_path, config, TRANSFORMER_FIELDS, patch_nums=patch_nums,
                         latent_channels=vae.config.latent_channels, vocab_size=vae.config.vocab_size)
    head = _build(HARTResidualHead, config_path, config, HEAD_FIELDS, latent_channels=vae.config.latent_channels,
                  condition_dim=transformer.config.embed_dim)
    trunk_state, head_state = split_official_transformer_state(raw)
    _check_keys("transformer", transformer, trunk_state)
    _check_keys("residual head", head, head_state)
    transformer.load_state_dict(trunk_state)
    head.load_state_dict(head_state)
    return HARTComponents(transformer=transformer, residual_head=head, vae=vae, scheduler=HARTResidualScheduler())


def check_destination(dst: str) -> None:
    """``dst`` must be a folder (new or existing) that can be written; checked before the (slow) conversion."""
    path = os.path.abspath(dst)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"The destination {dst} exists and is not a folder; choose a new folder name.")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointError(f"The destination {dst} cannot be created: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"The destination {dst} is not writable ({parent} denies writing); choose another folder.")


def convert(src: str, dst: str, ema: bool = True, text_encoder: Optional[str] = None,
            push_to_hub: Optional[str] = None):
    """Convert ``src`` (official layout) to a complete ``HARTPipeline`` folder ``dst`` and return the pipeline.

    Args:
        text_encoder: a folder (or Hub id) with the Qwen2 text model and its tokenizer
            (``mit-han-lab/Qwen2-VL-1.5B-Instruct`` for the released model), saved into the pipeline;
            without it the pipeline has no text encoder and is given one at ``from_pretrained``.
        push_to_hub: a Hub repo id to upload the converted folder to.
    """
    from .hub import write_model_card
    from .pipeline_hart import HARTPipeline

    check_destination(dst)
    components = convert_official(src, ema=ema)
    tokenizer = encoder = None
    if text_encoder is not None:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(text_encoder)
        encoder = AutoModel.from_pretrained(text_encoder)
        if encoder.config.hidden_size != components.transformer.config.context_dim:
            raise CheckpointError(
                f"The text encoder {text_encoder} has hidden size {encoder.config.hidden_size}; the transformer "
                f"expects context_dim={components.transformer.config.context_dim}."
            )
    pipe = HARTPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=components.vae,
                        transformer=components.transformer, residual_head=components.residual_head,
                        scheduler=components.scheduler, use_system_prompt=True)
    os.makedirs(dst, exist_ok=True)
    write_model_card(
        dst, title=f"HART ({os.path.basename(os.path.abspath(src.rstrip('/')))}) for diffusers",
        description=f"Converted from the official HART checkpoint layout ({'EMA' if ema else 'non-EMA'} weights) with "
                    "`python -m hart_pipeline.convert`." + ("" if encoder is not None else
                    " The text encoder is not included: pass `text_encoder=` and `tokenizer=` "
                    "(Qwen2-VL-1.5B-Instruct for the released model) to `from_pretrained`."),
        repo_id=push_to_hub or dst, size=pipe.default_size, base_model="mit-han-lab/hart-0.7b-1024px",
    )
    pipe.save_pretrained(dst, push_to_hub=bool(push_to_hub), repo_id=push_to_hub)
    return pipe


def run(args: argparse.Namespace) -> None:
    """Convert as the parsed arguments say and report it."""
    convert(args.src, args.dst, ema=args.ema, text_encoder=args.text_encoder, push_to_hub=args.push_to_hub)
    print(f"Converted {args.src} -> {args.dst}")


def main(argv: Optional[Iterable[str]] = None) -> None:
    from .cli import add_convert_arguments

    parser = argparse.ArgumentParser(prog="python -m hart_pipeline.convert", description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (ValueError, OSError) as e:  # CheckpointError and file-system errors: one line, no traceback
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
