"""Shared training helpers: EMA of weights, config files, checkpoint bookkeeping."""

import argparse
import json
import math
import os
import re
import time
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of a module's floating-point parameters.

    ``decay_t = min(decay, (1 + step) / (10 + step))`` (warm-up so early averages are not dominated
    by the random init). Checkpointable through ``state_dict`` / ``load_state_dict`` (works with
    ``accelerator.register_for_checkpointing``).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().clone().float() for name, p in module.named_parameters() if p.dtype.is_floating_point
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

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


class TrainState:
    """The step counter (and anything scalar) saved alongside accelerate's checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


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


__all__ = ["EMA", "TrainState", "latest_checkpoint", "parse_with_config", "prune_checkpoints", "save_args"]


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
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--checkpoint_every", type=int, default=200)
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--resume", type=str, default=None, help="checkpoint folder, or 'latest'")


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 0.1x of the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def log_and_checkpoint(accelerator, args: argparse.Namespace, state: "TrainState", running: Dict[str, float], bar,
                       log_path: str, start: float, postfix_keys: Iterable[str]) -> bool:
    """End-of-step bookkeeping shared by the trainers: every ``log_every`` steps write ``running`` (the
    averaged losses plus whatever the caller added) to the JSON-lines log and the progress bar, every
    ``checkpoint_every`` steps save a resumable checkpoint. Returns True when training is done."""
    if state.step % args.log_every == 0:
        running.update(step=state.step, minutes=(time.time() - start) / 60)
        bar.set_postfix({k: f"{running[k]:.4f}" for k in postfix_keys})
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(running) + "\n")
        running.clear()
    out_of_time = args.max_minutes > 0 and (time.time() - start) / 60 > args.max_minutes
    done = state.step >= args.train_steps or out_of_time
    if state.step % args.checkpoint_every == 0 or done:
        accelerator.wait_for_everyone()
        accelerator.save_state(os.path.join(args.output_dir, "checkpoints", f"step_{state.step}"))
        if accelerator.is_main_process:
            prune_checkpoints(args.output_dir, args.keep_checkpoints)
    return done
