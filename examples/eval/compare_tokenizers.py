"""Table 1 analogue: reconstruction quality of groups of tokenizers (e.g. 3 training seeds each of the hybrid
tokenizer and of the discrete-only, VAR-style baseline), mean ± std over each group's tokenizers.

Every tokenizer reconstructs the same ``--num-images`` held-out scenes (the held-out prompt set's data seed,
never used for training). A hybrid tokenizer is read with both decodings (discrete tokens alone, and discrete
tokens + residual); a discrete-only tokenizer's own decoding is its discrete one. Figures: PSNR and the
Fréchet distance of random-CNN features (``evaluate.py``: comparable within the table only).

    python examples/eval/compare_tokenizers.py --group hybrid runs/tok_hybrid_s0/vae runs/tok_hybrid_s1/vae ... \
        --baseline discrete-only runs/tok_discrete_s0/vae ... --output eval/table1.md
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

import torch

from hart_pipeline import HARTHybridTokenizer  # before the path below: peft looks for a package named `evaluate`

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate import fmt, heldout_scenes, mean_std, reconstruction  # noqa: E402
from heldout import load_heldout  # noqa: E402


def heldout_images(num_images: int, size: int = 64) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: the first scenes of the held-out data seed (those of ``evaluate.py``)."""
    return heldout_scenes(load_heldout(check=False)["data_seed"], num_images, size)


def compare(groups: Dict[str, Sequence[str]], num_images: int, baselines: Sequence[str] = ()) -> Dict[str, Dict]:
    """{group: {metric: {mean, std}, "tokenizers": [...], ...}} over each group's tokenizer folders.

    ``baselines`` names the discrete-only groups: their decoder was trained on discrete tokens alone, so only
    their discrete decoding is reported.
    """
    images = heldout_images(num_images)
    out = {}
    for name, paths in groups.items():
        rows = [reconstruction(HARTHybridTokenizer.from_pretrained(p).eval(), images) for p in paths]
        out[name] = {"tokenizers": list(paths), "discrete_only": name in baselines,
                     **{k: mean_std([r[k] for r in rows]) for k in rows[0]}, "per_tokenizer": rows}
    return out


def markdown(result: Dict[str, Dict], num_images: int) -> str:
    lines = [f"Reconstruction of {num_images} held-out images; mean ± std over each group's tokenizers.", "",
             "| tokenizer | decoding | PSNR (dB) | Fréchet distance |", "|---|---|---|---|"]
    for name, r in result.items():
        n = len(r["tokenizers"])
        lines.append(f"| {name} ({n}) | discrete tokens | {fmt(r['psnr_discrete'], 2)} | {fmt(r['fd_discrete'], 5)} |")
        if not r["discrete_only"]:
            lines.append(f"| {name} ({n}) | discrete + residual | {fmt(r['psnr_hybrid'], 2)} | {fmt(r['fd_hybrid'], 5)} |")
    return "\n".join(lines) + "\n"


def parse_groups(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", default=[], metavar=("NAME", "VAE"),
                        help="a group name followed by its hybrid tokenizer folders (repeat per group)")
    parser.add_argument("--baseline", nargs="+", action="append", default=[], metavar=("NAME", "VAE"),
                        help="the same for a group of discrete-only (VAR-style) tokenizers")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--output", help="write the markdown table here (and the figures beside it as .json)")
    args = parser.parse_args(argv)
    if not args.group and not args.baseline:
        parser.error("name at least one group: --group NAME VAE [VAE ...] or --baseline NAME VAE [VAE ...]")
    for group in args.group + args.baseline:
        if len(group) < 2:
            parser.error(f"--group {group[0]} names no tokenizer folder: give --group NAME VAE [VAE ...]")
    return args


def main(argv=None) -> None:
    args = parse_groups(argv)
    groups = {g[0]: g[1:] for g in args.group + args.baseline}
    if len(groups) != len(args.group) + len(args.baseline):
        raise SystemExit("error: two groups have the same name; give each --group / --baseline its own NAME")
    result = compare(groups, args.num_images, baselines=[g[0] for g in args.baseline])
    text = markdown(result, args.num_images)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
