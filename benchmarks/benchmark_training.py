"""Transformer training step time with and without HART's final-scale token dropping.

The paper reports a training speed-up from removing ~80% of the final-scale tokens from the pass
(1.4x at 512px, 1.9x at 1024px). This script measures it on our ``transformer_loss`` (the official
training forward): random weights of the released architecture, the released text length (300), residual
head and patch schedules, one step = forward + backward + AdamW update.

    python benchmarks/benchmark_training.py --resolution 512 1024 --device cuda --dtype bf16 --batch 8
    # CPU: two reduced depths; the step time is affine in the depth (identical blocks), so the
    # released depth (24) is extrapolated from them
    python benchmarks/benchmark_training.py --resolution 512 --layers 1 2 --device cpu

With dropping, every step keeps the expected number of final-scale tokens (the mean over 1000 draws of
the official truncated-normal mask rate; at random positions), so a few steps give a stable figure;
each figure is the fastest of ``--steps`` steps after ``--warmup`` unmeasured ones.
"""

import argparse
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hart_pipeline import HARTHybridTokenizer, HARTResidualHead, HARTResidualScheduler, HARTTransformer  # noqa: E402
from hart_pipeline.schedules import PATCH_NUMS  # noqa: E402
from hart_pipeline.training.losses import (  # noqa: E402
    TransformerTrainingDraws,
    sample_kept_positions,
    transformer_loss,
)


def expected_kept(num_tokens: int, draws: int = 1000) -> int:
    """Mean number of final-scale tokens HART's dropping keeps (``sample_kept_positions``), rounded."""
    g = torch.Generator().manual_seed(0)
    return round(sum(sample_kept_positions(1, num_tokens, generator=g).shape[1] for _ in range(draws)) / draws)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_steps(args, resolution: int, layers: int) -> Dict[str, float]:
    """Seconds per step (the fastest of the measured steps: the least disturbed by other load) with all
    final-scale tokens and with dropping; the two settings alternate step by step on the same models."""
    device, patch_nums = torch.device(args.device), PATCH_NUMS[resolution]
    torch.manual_seed(args.seed)
    vae = HARTHybridTokenizer(patch_nums=patch_nums).to(device).eval().requires_grad_(False)
    transformer = HARTTransformer(num_layers=layers, embed_dim=args.width, num_heads=args.width // 64,
                                  context_dim=args.width, patch_nums=patch_nums).to(device)
    head = HARTResidualHead(condition_dim=args.width).to(device)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        head.enable_gradient_checkpointing()
    scheduler = HARTResidualScheduler()
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    optimizer = torch.optim.AdamW(list(transformer.parameters()) + list(head.parameters()), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    B, Cv, side = args.batch, vae.config.latent_channels, patch_nums[-1]
    context = torch.randn(B, 300, args.width, generator=g).to(device)
    positions = torch.arange(300)[None].repeat(B, 1).to(device)
    indices = [torch.randint(0, vae.config.vocab_size, (B, pn * pn), generator=g).to(device) for pn in patch_nums]
    residual = (0.1 * torch.randn(B, Cv, side, side, generator=g)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    num_kept = {"all": side * side, "dropping": expected_kept(side * side)}
    seconds = {name: [] for name in num_kept}
    for step in range(args.warmup + args.steps):
        for name, k in num_kept.items():
            kept = torch.rand(B, side * side, generator=g).argsort(1)[:, :k].sort(1).values
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32"):
                out = transformer_loss(transformer, head, vae, scheduler.tables, context, positions, indices, residual,
                                       patch_nums=patch_nums, generator=g,
                                       draws=TransformerTrainingDraws(kept_positions=kept))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
    return {"all": min(seconds["all"]), "dropping": min(seconds["dropping"]),
            "kept": num_kept["dropping"] / side**2, "sequence": 300 + sum(pn * pn for pn in patch_nums) - 1}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], choices=sorted(PATCH_NUMS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=[24],
                        help="transformer depth(s) (released: 24); two depths: extrapolate to --target-layers")
    parser.add_argument("--target-layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1536, help="transformer width (released: 1536)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32: off)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"HART transformer training step, width={args.width}, batch={args.batch}, {args.device} {args.dtype}, "
          f"torch {torch.__version__}")
    for resolution in args.resolution:
        times = {}
        for layers in args.layers:
            t = time_steps(args, resolution, layers)
            times[layers] = (t["all"], t["dropping"])
            print(f"  {resolution}px (sequence {t['sequence']}), {layers} layers: all tokens {t['all']:.3f} s/step; "
                  f"dropping (kept {100 * t['kept']:.0f}% of the final scale) {t['dropping']:.3f} s/step "
                  f"-> speed-up x{t['all'] / t['dropping']:.2f}", flush=True)
        if len(times) >= 2:
            lo, hi = min(times), max(times)
            slopes = [(times[hi][i] - times[lo][i]) / (hi - lo) for i in (0, 1)]
            if min(slopes) <= 0:
                print(f"  {resolution}px: not extrapolated (the step time did not grow with the depth: the machine "
                      "load changed between the runs)")
                continue
            full, dropped = (times[lo][i] + (args.target_layers - lo) * slopes[i] for i in (0, 1))
            print(f"  {resolution}px, {args.target_layers} layers (extrapolated): all tokens {full:.3f} s/step; "
                  f"dropping {dropped:.3f} s/step -> speed-up x{full / dropped:.2f}")

if __name__ == "__main__":
    main()
