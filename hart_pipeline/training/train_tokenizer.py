"""Train a HART hybrid tokenizer (VQ autoencoder + multi-scale residual quantizer) with accelerate.

    python -m hart_pipeline.training.train_tokenizer --config examples/training/tokenizer_tiny.json \
        --output_dir runs/tokenizer
    python -m hart_pipeline.training.train_tokenizer --config examples/training/tokenizer_tiny.json \
        --output_dir runs/tokenizer_discrete --discrete_only       # the VAR-style baseline of Table 1

Writes ``<output_dir>/vae`` (``HARTHybridTokenizer.save_pretrained``, safetensors), resumable
``<output_dir>/checkpoints/step_*`` (safetensors + JSON only: model, optimizer, RNG, step, EMA; see
``checkpoint.py``), ``<output_dir>/train_log.jsonl`` and, with ``--eval_every``, contact sheets of
reconstructions in ``<output_dir>/samples``. Works on one CPU / GPU or many (``accelerate launch``).
"""

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..models.tokenizer import HARTHybridTokenizer
from .data import SyntheticShapesDataset, collate
from .losses import tokenizer_loss
from .utils import TrainingSession, add_optimisation_args, contact_sheet, log_and_checkpoint, lr_lambda, parse_with_config, save_args


class TokenizerTrainingModule(torch.nn.Module):
    """Wraps the tokenizer so that ``forward`` returns the loss (DDP-friendly)."""

    def __init__(self, tokenizer: HARTHybridTokenizer, **loss_kwargs):
        super().__init__()
        self.tokenizer = tokenizer
        self.loss_kwargs = loss_kwargs

    def forward(self, images: torch.Tensor):
        return tokenizer_loss(self.tokenizer, images, **self.loss_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="JSON/YAML file whose keys set these options' defaults")
    p.add_argument("--output_dir", type=str, required=False, default="runs/tokenizer")
    # data
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=50000, help="synthetic training set size")
    p.add_argument("--data_seed", type=int, default=0)
    # model
    p.add_argument("--latent_channels", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--channel_multipliers", type=int, nargs="+", default=[1, 1, 2, 2])
    p.add_argument("--num_res_blocks", type=int, default=1)
    p.add_argument("--quant_resi", type=float, default=0.5)
    p.add_argument("--num_phi", type=int, default=4)
    p.add_argument("--patch_nums", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    # loss
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    p.add_argument("--l1_weight", type=float, default=1.0)
    p.add_argument("--l2_weight", type=float, default=1.0)
    p.add_argument("--vq_weight", type=float, default=1.0)
    p.add_argument("--continuous_prob", type=float, default=0.5, help="P(decoder sees the continuous latent)")
    p.add_argument("--discrete_only", action="store_true",
                   help="VAR-style baseline (paper Table 1): the decoder always sees the discrete latent (no residual, "
                        "no alternating training; overrides --continuous_prob)")
    p.add_argument("--dead_code_restart_every", type=int, default=100,
                   help="re-initialise codes unused during this many steps from recent quantiser inputs (0: off)")
    add_optimisation_args(p, batch_size=16, weight_decay=0.0, ema_decay=0.0)
    p.add_argument("--num_workers", type=int, default=0)
    return p


@torch.no_grad()
def restart_dead_codes(tokenizer: HARTHybridTokenizer, usage: torch.Tensor, pool: torch.Tensor, step: int) -> int:
    """Set unused codebook rows to random recent quantiser inputs; identical on every process."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0 or len(pool) == 0:
        return 0
    g = torch.Generator().manual_seed(step)
    pick = torch.randint(0, len(pool), (len(dead),), generator=g)
    noise = torch.randn(len(dead), pool.shape[1], generator=g) * 1e-3
    emb = tokenizer.quantizer.embedding.weight
    emb[dead.to(emb.device)] = (pool.cpu()[pick] + noise).to(emb.device, emb.dtype)
    return len(dead)


def main(argv=None):
    args = parse_with_config(build_parser(), argv)
    torch.set_num_threads(args.num_threads)
    session = TrainingSession(args)
    accelerator = session.accelerator
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, os.path.join(args.output_dir, "train_args.json"))

    tokenizer = HARTHybridTokenizer(
        latent_channels=args.latent_channels, vocab_size=args.vocab_size, base_channels=args.base_channels,
        channel_multipliers=tuple(args.channel_multipliers), num_res_blocks=args.num_res_blocks,
        quant_resi=args.quant_resi, num_phi=args.num_phi, patch_nums=tuple(args.patch_nums),
    )
    with torch.no_grad():  # small codebook init (VAR style) so that early lookups spread out
        tokenizer.quantizer.embedding.weight.uniform_(-1.0 / args.vocab_size, 1.0 / args.vocab_size)
    if args.gradient_checkpointing:
        tokenizer.enable_gradient_checkpointing()
    module = TokenizerTrainingModule(
        tokenizer, patch_nums=tuple(args.patch_nums), beta=args.beta, l1_weight=args.l1_weight,
        l2_weight=args.l2_weight, vq_weight=args.vq_weight,
        continuous_prob=0.0 if args.discrete_only else args.continuous_prob,
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.train_steps))
    dataset = SyntheticShapesDataset(args.num_samples, args.image_size, args.data_seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                        num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed))
    module, optimizer, _, scheduler = session.prepare(module, optimizer, loader, scheduler,
                                                      ema_module=lambda m: m.tokenizer)
    eval_images = collate([dataset[i] for i in range(min(args.eval_samples, len(dataset)))])["image"]

    def evaluate(path: str) -> None:
        """Contact sheet: the first dataset images (top row) and their reconstructions (bottom row): hybrid, or
        from the discrete tokens alone with ``--discrete_only`` (the decoder input that run trains)."""
        tok = session.unwrapped.tokenizer
        tok.eval()
        with torch.no_grad(), accelerator.autocast():
            if args.discrete_only:
                recon = tok.decode(tok.encode(eval_images.to(accelerator.device)).indices).sample
            else:
                recon = tok.decoder(tok.post_quant_conv(tok.encode_latent(eval_images.to(accelerator.device))))
        tok.train()
        contact_sheet((torch.cat([eval_images, recon.float().cpu()]) + 1) / 2, len(eval_images), path)

    usage = torch.zeros(args.vocab_size, device=accelerator.device)
    pool = []
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    bar = tqdm(total=args.train_steps, initial=session.step, disable=not accelerator.is_main_process,
               desc="tokenizer", unit="step", dynamic_ncols=True)
    start = time.time()
    running = {}
    done = session.step >= args.train_steps
    for batch in session.batches() if not done else []:
        module.train()
        with accelerator.autocast():
            out = module(batch["image"])
        accelerator.backward(out.loss)
        if args.grad_clip > 0:
            accelerator.clip_grad_norm_(module.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        session.step += 1
        tok = session.unwrapped.tokenizer
        if session.ema is not None:
            session.ema.update(tok)
        if args.dead_code_restart_every > 0:
            for idx in out.indices:
                usage += torch.bincount(idx.flatten(), minlength=args.vocab_size).float()
            pool.append(out.lookup_inputs[torch.randperm(len(out.lookup_inputs))[:256]])
            pool = pool[-8:]
            if session.step % args.dead_code_restart_every == 0:
                all_usage = accelerator.reduce(usage, reduction="sum")
                all_pool = accelerator.gather(torch.cat(pool))
                n = restart_dead_codes(tok, all_usage, all_pool, session.step)
                running["restarted"] = n
                usage.zero_()
        for k in ("loss", "recon_loss", "vq_loss"):
            running[k] = running.get(k, 0.0) + getattr(out, k).item() / args.log_every
        running["continuous_frac"] = running.get("continuous_frac", 0.0) + float(out.used_continuous) / args.log_every
        bar.update(1)
        if session.step % args.log_every == 0:
            running.update(lr=scheduler.get_last_lr()[0], codes_used_last_scale=int(torch.unique(out.indices[-1]).numel()))
        done = log_and_checkpoint(accelerator, args, session.step, running, bar, log_path, start,
                                  ("loss", "vq_loss"), session.save, evaluate)
        if done:
            break
    bar.close()

    checksums = session.parameter_checksums()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tok = session.unwrapped.tokenizer
        if session.ema is not None:
            session.ema.copy_to(tok)
        tok.save_pretrained(os.path.join(args.output_dir, "vae"), safe_serialization=True)
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
            json.dump({"steps": session.step, "wall_minutes": (time.time() - start) / 60,
                       "num_processes": accelerator.num_processes, "rank_parameter_checksums": checksums}, f, indent=2)
        accelerator.print(f"saved {args.output_dir}/vae after {session.step} steps")
    del module, optimizer  # the prepared (DDP-wrapped) objects: see TrainingSession.close
    session.close()


if __name__ == "__main__":
    main()
