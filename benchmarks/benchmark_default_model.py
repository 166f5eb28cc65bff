"""Seconds per image of the shipped built-in model (issue 11's target: under 1 s on 2 CPU cores).

Loads the built-in model once, warms up, then times ``--images`` generations of the README's prompt at each
batch size and thread count (default settings: guidance 4.5, 8 residual steps, PIL output; text encoding,
both stages and the decode included).

    python benchmarks/benchmark_default_model.py [--threads 1 2] [--batch 1 8] [--images 16]
"""

import argparse
import time

import torch

from hart_pipeline.default_model import load_default_pipeline

PROMPT = "a red circle above a blue square"


def seconds_per_image(pipe, batch: int, images: int) -> float:
    pipe([PROMPT] * batch, generator=torch.Generator().manual_seed(0))  # warm-up
    runs = max(1, images // batch)
    start = time.perf_counter()
    for seed in range(runs):
        pipe([PROMPT] * batch, generator=torch.Generator().manual_seed(seed))
    return (time.perf_counter() - start) / (runs * batch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="prompts per call")
    parser.add_argument("--images", type=int, default=16, help="images timed per setting")
    args = parser.parse_args(argv)
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    print("| threads | batch | s / image |\n|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            print(f"| {threads} | {batch} | {seconds_per_image(pipe, batch, args.images):.3f} |", flush=True)


if __name__ == "__main__":
    main()
