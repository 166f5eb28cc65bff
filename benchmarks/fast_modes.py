"""Speed / quality trade-off of the opt-in fast modes on the built-in model (or any pipeline folder).

Modes (arguments of ``HARTPipeline.__call__`` / ``generate_tokens``; the default is the official sampler):
* ``guidance_stop_scale=N`` (Switti, arXiv 2412.01819): no classifier-free guidance from scale N on;
* ``token_pruning={side: fraction}`` (FastVAR, arXiv 2503.23367): only the pivotal tokens of those scales
  run through the transformer, the others are restored from the previous scale.

For every mode and held-out prompt of examples/eval/heldout_prompts.json (seeded, the same for every mode) it
prints the seconds per image (text encoding excluded: computed once per prompt), the prompt adherence of the
independent checker examples/eval/adherence.py (colour, both colours, relation, count, shape, position) and the consistency with the default sampler (mean
absolute pixel difference to the default image of the same seed, in [0, 1]).

    python benchmarks/fast_modes.py [--model PATH] [--num-prompts 32] [--threads 2] [--repeats 1]
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "eval"))

from adherence import mean_scores, score_image  # noqa: E402
from evaluate import to_uint8  # noqa: E402
from heldout import load_heldout  # noqa: E402

from hart_pipeline import HARTPipeline, add_residual, decode_tokens, generate_tokens  # noqa: E402
from hart_pipeline.default_model import load_default_pipeline  # noqa: E402


def modes(patch_nums):
    """The measured settings for a schedule: the last one or two scales unguided, the largest scales pruned."""
    num_scales, last, prev = len(patch_nums), patch_nums[-1], patch_nums[-2]
    return {
        "official (default)": {},
        f"guidance_stop_scale={num_scales - 1}": {"guidance_stop_scale": num_scales - 1},
        f"guidance_stop_scale={num_scales - 2}": {"guidance_stop_scale": num_scales - 2},
        f"token_pruning={{{last}: 0.5}}": {"token_pruning": {last: 0.5}},
        f"token_pruning={{{last}: 0.75}}": {"token_pruning": {last: 0.75}},
        f"token_pruning={{{prev}: 0.5, {last}: 0.75}}": {"token_pruning": {prev: 0.5, last: 0.75}},
        f"both (stop {num_scales - 2}, prune {{{prev}: 0.5, {last}: 0.75}})":
            {"guidance_stop_scale": num_scales - 2, "token_pruning": {prev: 0.5, last: 0.75}},
    }


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HART pipeline folder (default: the built-in model)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per image (the fastest is kept)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_default_pipeline() if args.model is None else HARTPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    items = [entry["prompt"] for entry in load_heldout()["prompts"][:args.num_prompts]]
    prompts = [pipe.encode_prompt(item)[:2] for item in items]
    patch_nums = tuple(pipe.transformer.config.patch_nums)

    def sample(embeds, positions, seed, kwargs):
        g = torch.Generator().manual_seed(seed)
        tokens = generate_tokens(pipe.transformer, pipe.vae, embeds, positions, generator=g, **kwargs)
        return decode_tokens(pipe.vae, add_residual(tokens, pipe.residual_head, pipe.scheduler, generator=g))[0]

    report, reference = {}, None
    for name, kwargs in modes(patch_nums).items():
        images, seconds = [], 0.0
        for i, (embeds, positions) in enumerate(prompts):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                image = sample(embeds, positions, i, kwargs)
                best = min(best, time.perf_counter() - start)
            seconds += best
            images.append(image)
        scores = mean_scores([score_image(to_uint8(im * 2 - 1), item) for im, item in zip(images, items)])
        reference = reference or images
        diff = float(np.mean([(a - b).abs().mean().item() for a, b in zip(images, reference)]))
        report[name] = {"seconds_per_image": round(seconds / len(items), 4), **{k: None if v is None else round(v, 3) for k, v in scores.items()},
                        "mean_abs_diff_to_default": round(diff, 4)}
        print(f"{name:55s} {report[name]}", flush=True)
    base = report["official (default)"]["seconds_per_image"]
    for row in report.values():
        row["speedup"] = round(base / row["seconds_per_image"], 2)
    print(json.dumps({"model": args.model or "built-in", "patch_nums": patch_nums, "threads": torch.get_num_threads(),
                      "num_prompts": args.num_prompts, "modes": report}, indent=2))


if __name__ == "__main__":
    main()
