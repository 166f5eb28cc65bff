"""Shared training helpers: EMA of weights, config files, checkpoint bookkeeping."""

import argparse
import gc
import json
import math
import os
import re
import time
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of a module's trained (``requires_grad``) floating-point parameters.

    ``decay_t = min(decay, (1 + step) / (10 + step))`` (warm-up so early averages are not dominated
    by the random init). Saved in checkpoints as ``ema.safetensors`` (see :mod:`.checkpoint`).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().clone().float() for name, p in module.named_parameters()
            if p.requires_grad and p.dtype.is_floating_point
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (same parameter names)."""
        for name, p in module.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def load(self, shadow: Dict[str, torch.Tensor], decay: float, num_updates: int) -> None:
        if set(shadow) != set(self.shadow):
            raise ValueError(f"EMA weights do not fit this model: {sorted(set(shadow) ^ set(self.shadow))[:5]}")
        self.decay, self.num_updates = decay, int(num_updates)
        self.shadow = {k: v.float().to(self.shadow[k].device) for k, v in shadow.items()}


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    """argparse with an optional ``--config`` JSON (or YAML, if PyYAML is installed) file.

    Values in the file become the defaults; explicit command-line flags override them.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            if known.config.endswith((".yaml", ".yml")):
                import yaml

                cfg = yaml.safe_load(f)
            else:
                cfg = json.load(f)
        valid = {a.dest for a in parser._actions}
        unknown = set(cfg) - valid
        if unknown:
            raise ValueError(f"Unknown keys in {known.config}: {sorted(unknown)}")
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The ``checkpoints/step_*`` folder with the highest step, or None."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d))]
    return os.path.join(root, max(steps)[1]) if steps else None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    import shutil

    root = os.path.join(output_dir, "checkpoints")
    if keep <= 0 or not os.path.isdir(root):
        return
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d)))
    for _, d in steps[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def save_args(args: argparse.Namespace, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k != "config"}, f, indent=2)


__all__ = ["EMA", "contact_sheet", "latest_checkpoint", "parse_with_config", "prune_checkpoints", "save_args"]


def add_optimisation_args(p: argparse.ArgumentParser, batch_size: int, weight_decay: float, ema_decay: float) -> None:
    """The optimisation and bookkeeping options both trainers share."""
    p.add_argument("--train_steps", type=int, default=1000)
    p.add_argument("--max_minutes", type=float, default=0.0, help="stop (and save) after this wall time; 0: off")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=weight_decay)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=ema_decay, help="EMA decay of the trained weights; 0: off")
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="autocast dtype of the forward pass (bf16 works on CPU too); weights stay fp32")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--checkpoint_every", type=int, default=200)
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--resume", type=str, default=None, help="checkpoint folder, or 'latest'")
    p.add_argument("--eval_every", type=int, default=0, help="write a contact sheet of samples every N steps (0: off)")
    p.add_argument("--eval_samples", type=int, default=8, help="images on each contact sheet")


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 0.1x of the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def log_and_checkpoint(accelerator, args: argparse.Namespace, step: int, running: Dict[str, float], bar,
                       log_path: str, start: float, postfix_keys: Iterable[str],
                       save: Callable[[str], None], evaluate: Callable[[str], None]) -> bool:
    """End-of-step bookkeeping shared by the trainers. Every ``log_every`` steps: the averaged losses on the
    progress bar, one readable line on the console and one JSON line in the log; every ``eval_every``
    steps: ``evaluate(path)`` writes a contact sheet (main process); every ``checkpoint_every`` steps and
    at the end: ``save(folder)`` (all processes). Returns True when training is done."""
    if step % args.log_every == 0:
        running.update(step=step, minutes=(time.time() - start) / 60)
        bar.set_postfix({k: f"{running[k]:.4f}" for k in postfix_keys})
        if accelerator.is_main_process:
            losses = "  ".join(f"{k} {v:.4f}" for k, v in running.items() if k not in ("step", "minutes", "lr"))
            bar.write(f"step {step:>6}/{args.train_steps}  {losses}  lr {running.get('lr', 0.0):.2e}  "
                      f"{running['minutes']:.1f} min")
            with open(log_path, "a") as f:
                f.write(json.dumps(running) + "\n")
        running.clear()
    if args.eval_every > 0 and step % args.eval_every == 0 and accelerator.is_main_process:
        evaluate(os.path.join(args.output_dir, "samples", f"step_{step}.png"))
    out_of_time = args.max_minutes > 0 and (time.time() - start) / 60 > args.max_minutes
    if args.max_minutes > 0 and accelerator.num_processes > 1:
        # the main process's clock decides for all: a rank that stopped alone would leave the others waiting in
        # the next step's gradient all-reduce forever
        from accelerate.utils import broadcast

        flag = torch.tensor([float(out_of_time)], device=accelerator.device)
        out_of_time = bool(broadcast(flag, from_process=0).item())
    done = step >= args.train_steps or out_of_time
    if step % args.checkpoint_every == 0 or done:
        save(os.path.join(args.output_dir, "checkpoints", f"step_{step}"))
        if accelerator.is_main_process:
            prune_checkpoints(args.output_dir, args.keep_checkpoints)
    return done


def contact_sheet(images: torch.Tensor, columns: int, path: str) -> None:
    """Save images (N, 3, H, W) in [0, 1] as one PNG grid with ``columns`` per row (2 px dark gutters)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    sheet = torch.full((3, rows * (h + 2) + 2, columns * (w + 2) + 2), 0.1)
    for i, image in enumerate(images.float().clamp(0, 1).cpu()):
        r, c = divmod(i, columns)
        sheet[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray((sheet.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


class TrainingSession:
    """What both trainers share around their loop: the accelerator, and safe checkpoints (resume + save).

    Order of use: ``session = TrainingSession(args)`` (verifies a ``--resume`` checkpoint first) ->
    build the module -> :meth:`prepare` (loads the checkpoint's weights into the plain module, wraps
    everything with accelerate, then restores optimizer / LR schedule / EMA / RNG) -> loop with
    :attr:`step` -> :meth:`save` from every process.
    """

    def __init__(self, args: argparse.Namespace):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        from .checkpoint import read_checkpoint

        self.args = args
        # the LR schedule counts optimizer steps whatever the number of processes; the shuffle of epoch e
        # depends only on (seed, e), so a resumed run sees the batches an uninterrupted one would
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, step_scheduler_with_optimizer=False,
                                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        set_seed(args.seed)
        folder = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
        self.checkpoint = read_checkpoint(folder) if folder else None
        self.step = 0
        self.ema: Optional[EMA] = None
        self.fsdp = self.accelerator.distributed_type.name == "FSDP"

    def prepare(self, module: nn.Module, optimizer, loader, lr_scheduler, ema_module: Callable[[nn.Module], nn.Module],
                trained_only: bool = False):
        """Wrap for accelerate; resume. ``ema_module(unwrapped)`` is the part the EMA tracks;
        ``trained_only``: checkpoints hold only the parameters that require grad (LoRA mode)."""
        from .checkpoint import load_model_state, load_training_state

        if self.checkpoint is not None:
            load_model_state(self.checkpoint, module, trained_only)
        self.trained = {n for n, p in module.named_parameters() if p.requires_grad} if trained_only else None
        self.module, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            module, optimizer, loader, lr_scheduler)
        self.ema_module = ema_module
        if self.args.ema_decay > 0:
            self.ema = EMA(ema_module(self.unwrapped), self.args.ema_decay)
        if self.checkpoint is not None:
            self.step = load_training_state(self.checkpoint, self.accelerator, self.optimizer, self.lr_scheduler, self.ema)
            self.accelerator.print(f"resumed from {self.checkpoint.folder} at step {self.step}")
        return self.module, self.optimizer, self.loader, self.lr_scheduler

    def batches(self):
        """Training batches from the current step on, epoch after epoch (a resumed run continues mid-epoch)."""
        epoch, skip = divmod(self.step, len(self.loader))
        while True:
            self.loader.set_epoch(epoch)
            yield from (self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)
            epoch, skip = epoch + 1, 0

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.module)

    def save(self, folder: str) -> None:
        from .checkpoint import save_checkpoint

        state = self.accelerator.get_state_dict(self.module)
        if self.trained is not None:
            state = {k: v for k, v in state.items() if k in self.trained}
        save_checkpoint(folder, self.accelerator, state, self.optimizer, self.lr_scheduler, self.step, self.ema)

    def close(self) -> None:
        """End the run on every process: a barrier (no rank tears the process group down while the main one still
        exports), then the prepared objects are dropped before the process group is destroyed.

        The order matters with several processes: DDP's gradient reducer holds the process group, and if the
        reducer is the last to let go, the gloo group is destroyed with the GIL held while its worker thread
        needs the GIL to release the last collective's tensors: both wait forever at interpreter exit. The
        caller must drop its own reference to the prepared module first (``del module``).
        """
        self.accelerator.wait_for_everyone()
        self.module = self.optimizer = self.loader = self.lr_scheduler = None
        self.accelerator.free_memory()  # accelerate's own references to the prepared objects
        gc.collect()  # the DDP wrapper's reference cycles: its reducer goes now, while the group is registered
        self.accelerator.end_training()

    def parameter_checksums(self) -> list:
        """Sum of the trained parameters on every process (equal when the ranks stayed in sync)."""
        total = sum(p.detach().double().sum() for p in self.unwrapped.parameters() if p.requires_grad)
        return self.accelerator.gather(total.reshape(1).to(self.accelerator.device)).tolist()
