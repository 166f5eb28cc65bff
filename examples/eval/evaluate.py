"""Small-scale counterparts of the HART paper's Table 1 / Table 5 on the synthetic shapes domain.

1. Tokenizer reconstruction (Table 1): PSNR and a Fréchet distance between features of held-out real images
   and of their discrete-only / hybrid reconstructions, for one or more tokenizers (``--vaes``: e.g. three
   training seeds of the hybrid tokenizer, or of a ``--discrete_only`` one; mean ± std over them). The
   features are those of a fixed, seeded random CNN (available offline): absolute values are not comparable
   to Inception FID, comparisons between tokenizers are.
2. Generation (Table 5): prompt adherence (the independent checker of ``adherence.py`` on the fixed held-out
   prompts of ``heldout_prompts.json``) and the Fréchet distance to the real scenes of those prompts, with
   and without the residual stage, mean ± std over sampling seeds, also per layout (single object, two
   objects in a relation, counts). Ceilings: the checker on the real rendered scenes and on the tokenizer's
   reconstructions of them. The residual stage runs as the pipeline runs it, with the model's default
   guidance (``--residual-guidance official`` or a number overrides it).
3. Optional (``--teacher-forced-scales K ...``): where adherence is lost. The first K scales' tokens are
   those of the tokenizer's encoding of each prompt's real scene and the AR stage samples the rest; the
   adherence of those images (discrete decoding) against K shows which scales the model gets wrong.

Writes ``<output-dir>/contact_sheet.png`` (prompts x seeds, with the residual stage), ``report.md`` and
``report.json``.

    python examples/eval/evaluate.py                                  # the built-in model, 48 prompts x 3 seeds
    python examples/eval/evaluate.py --model runs/hart --num-prompts 256 --num-images 512
    python examples/eval/evaluate.py --model runs/hart --vaes runs/tok_s0/vae runs/tok_s1/vae runs/tok_s2/vae
    python examples/eval/evaluate.py --teacher-forced-scales 0 2 4 5
    python examples/eval/evaluate.py --num-prompts 256 --residual-guidance official
"""

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adherence import (CRITERIA, RELATION_OUTCOMES, mean_scores, parse_prompt, relation_outcome,  # noqa: E402
                       score_image, swap_colours)
from heldout import HELDOUT_PATH, load_heldout  # noqa: E402

from hart_pipeline import (HARTHybridTokenizer, HARTPipeline, HARTResidualScheduler, add_residual, decode_tokens,  # noqa: E402
                           generate_tokens)
from hart_pipeline.default_model import load_default_pipeline  # noqa: E402
from hart_pipeline.validation import check_residual_guidance  # noqa: E402
from hart_pipeline.training.data import LAYOUTS, SyntheticShapesDataset, collate  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / max(mse, 1e-12))


def random_features(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, 64) pooled activations of a fixed random CNN (seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = images.float()
    for c_in, c_out in ((3, 32), (32, 64), (64, 64)):
        w = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in ** 0.5)
        x = torch.relu(torch.nn.functional.conv2d(x, w, stride=2, padding=1))
    return x.mean(dim=(2, 3)).numpy().astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


@torch.no_grad()
def reconstruction(vae: HARTHybridTokenizer, images: torch.Tensor, batch_size: int = 64) -> Dict[str, float]:
    """PSNR and Fréchet distance of the discrete-only and hybrid reconstructions of (N, 3, H, W) images."""
    discrete, hybrid = [], []
    for s in range(0, len(images), batch_size):
        tokens = vae.encode(images[s:s + batch_size].to(vae.device, vae.dtype))
        discrete.append(vae.decode(tokens.indices).sample.float().cpu())
        hybrid.append(vae.decode(tokens.indices, tokens.residual).sample.float().cpu())
    discrete, hybrid, real = torch.cat(discrete), torch.cat(hybrid), random_features(images)
    return {"psnr_discrete": psnr(discrete, images), "psnr_hybrid": psnr(hybrid, images),
            "fd_discrete": frechet_distance(real, random_features(discrete)),
            "fd_hybrid": frechet_distance(real, random_features(hybrid))}


@torch.no_grad()
def generate(pipe: HARTPipeline, prompts: List[str], seed: int, guidance_scale: float, batch_size: int = 16,
             prefix: Sequence[torch.Tensor] = ()):
    """Images (N, 3, H, W) in [-1, 1] with and without the residual stage, from the same tokens.

    ``prefix``: indices (N, pn^2) of the first scales, taken instead of sampled (teacher forcing).
    """
    g = torch.Generator().manual_seed(seed)
    out = {"with_residual": [], "discrete_only": []}
    for s in range(0, len(prompts), batch_size):
        embeds, positions, _, _ = pipe.encode_prompt(prompts[s:s + batch_size])
        tokens = generate_tokens(pipe.transformer, pipe.vae, embeds, positions, guidance_scale=guidance_scale, generator=g,
                                 prefix_indices=[p[s:s + batch_size] for p in prefix] or None)
        tokens = add_residual(tokens, pipe.residual_head, pipe.scheduler, generator=g)
        for key, discrete_only in (("with_residual", False), ("discrete_only", True)):
            out[key].append(decode_tokens(pipe.vae, tokens, discrete_only=discrete_only).float().cpu() * 2 - 1)
    return {key: torch.cat(v) for key, v in out.items()}


def contact_sheet(rows: List[List[np.ndarray]], labels: List[str], columns: List[str], path: str) -> None:
    """A PNG grid: one row per prompt (its text on the left), one column per sampling seed."""
    size = rows[0][0].shape[0]
    scale = max(1, 96 // size)
    cell, label_w, head_h = size * scale + 4, 330, 18
    sheet = Image.new("RGB", (label_w + cell * len(columns), head_h + cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((label_w + j * cell + 2, 3), name, fill=(0, 0, 0))
    for i, (label, images) in enumerate(zip(labels, rows)):
        y = head_h + i * cell
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(label, 52)[:5]), fill=(0, 0, 0))
        for j, image in enumerate(images):
            tile = Image.fromarray(image).resize((size * scale, size * scale), Image.NEAREST)
            sheet.paste(tile, (label_w + j * cell + 2, y + 2))
    sheet.save(path)


def fmt(stat: Dict[str, Optional[float]], digits: int = 2) -> str:
    """A :func:`mean_std` figure as "mean ± std" ("-" when there is none)."""
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def heldout_scenes(data_seed: int, num_images: int, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: the first scenes of the held-out data seed (reconstruction figures)."""
    scenes = SyntheticShapesDataset(10 ** 7, size, data_seed)
    return collate([scenes[i] for i in range(num_images)])["image"]


def write_report(result: Dict, path: str) -> None:
    """The markdown report: per-criterion adherence (mean ± std over seeds) and the Fréchet / PSNR figures."""
    a = result["adherence"]
    lines = [f"# Evaluation of `{result['model']}`", "",
             f"{result['num_prompts']} held-out prompts (`{os.path.basename(result['heldout'])}`) x sampling seeds "
             f"{result['seeds']}, guidance {result['guidance_scale']}, residual-stage guidance "
             f"{result['residual_guidance']}; mean ± std over seeds "
             "(ceilings: one deterministic value).", "",
             "| prompt adherence | " + " | ".join(CRITERIA) + " | Fréchet distance |",
             "|---|" + "---|" * (len(CRITERIA) + 1)]
    for key, name in (("with_residual", "generated, with the residual stage"),
                      ("discrete_only", "generated, discrete tokens only")):
        lines.append(f"| {name} | " + " | ".join(fmt(a[key][c]) for c in CRITERIA)
                     + f" | {fmt(result['frechet'][key], 4)} |")
    for key, name in (("tokenizer_reconstructions", "tokenizer reconstructions of the real scenes"),
                      ("real_images", "real scenes (ceiling of the checker)")):
        lines.append(f"| {name} | " + " | ".join("-" if a[key][c] is None else f"{a[key][c]:.2f}" for c in CRITERIA)
                     + " | - |")
    lines += ["", "Per layout (generated, with the residual stage):", "",
              "| layout | prompts | " + " | ".join(CRITERIA) + " |", "|---|---|" + "---|" * len(CRITERIA)]
    for name, row in result["by_layout"].items():
        n = result["layouts"].count(name)
        lines.append(f"| {name} | {n} | " + " | ".join(fmt(row[c]) for c in CRITERIA) + " |")
    if result["relation_outcomes"]:
        lines += ["", "Two-colour relation prompts, what the two largest objects show (with the residual stage; "
                  "\"swapped\": right colours and direction, opposite order):", "",
                  "| " + " | ".join(RELATION_OUTCOMES) + " |", "|" + "---|" * len(RELATION_OUTCOMES),
                  "| " + " | ".join(fmt(result["relation_outcomes"][name]) for name in RELATION_OUTCOMES) + " |"]
    probe = result["order_probe"]
    if probe:
        lines += ["", f"Order probe ({probe['num_scenes']} real scenes of two-colour relation prompts, teacher-forced): "
                  f"CE of the {probe['scale']} tokens {probe['ce_true']:.3f} under the prompt, {probe['ce_swapped']:.3f} "
                  f"with its colour words swapped; the prompt explains {probe['order_accuracy']:.0%} of the scenes "
                  "better (50%: colours not bound to places)."]
    if result["teacher_forced"]:
        patch_nums = result["patch_nums"]
        lines += ["", "Where adherence is lost: the first K scales are the tokens of the real scene, the AR stage "
                  "samples the rest (discrete decoding):", "",
                  "| K | given scales | " + " | ".join(CRITERIA) + " |", "|---|---|" + "---|" * len(CRITERIA)]
        for k, row in result["teacher_forced"].items():
            given = ", ".join(f"{pn}x{pn}" for pn in patch_nums[:int(k)]) or "none"
            lines.append(f"| {k} | {given} | " + " | ".join(fmt(row[c]) for c in CRITERIA) + " |")
    r = result["reconstruction"]
    lines += ["", f"Tokenizer reconstruction of {r['num_images']} held-out images, mean ± std over "
              f"{len(r['vaes'])} tokenizer(s) ({', '.join(r['vaes'])}):", "",
              "| decoding | PSNR (dB) | Fréchet distance (random-CNN features) |", "|---|---|---|",
              f"| discrete only | {fmt(r['psnr_discrete'])} | {fmt(r['fd_discrete'], 5)} |",
              f"| hybrid (discrete + residual) | {fmt(r['psnr_hybrid'])} | {fmt(r['fd_hybrid'], 5)} |", "",
              f"Generation: {result['seconds_per_image']:.2f} s per image (both decodings included).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def adherence_by_layout(per_seed: List[List[Dict[str, Optional[float]]]], layouts: Sequence[str]) -> Dict:
    """{layout: {criterion: mean ± std over seeds}} from per-seed lists of per-image scores and each image's
    prompt layout (the held-out set's ``layout`` field)."""
    out = {}
    for name in LAYOUTS:
        rows = [i for i, kind in enumerate(layouts) if kind == name]
        if rows:
            means = [mean_scores([scores[i] for i in rows]) for scores in per_seed]
            out[name] = {c: mean_std([m[c] for m in means]) for c in CRITERIA}
    return out


def outcome_shares(per_seed: List[List[Optional[str]]]) -> Dict[str, Dict]:
    """{outcome: share of the two-colour relation images, mean ± std over seeds} (see ``relation_outcome``);
    empty without such prompts."""
    shares = {name: [] for name in RELATION_OUTCOMES}
    for outcomes in per_seed:
        drawn = [o for o in outcomes if o is not None]
        for name in RELATION_OUTCOMES:
            if drawn:
                shares[name].append(drawn.count(name) / len(drawn))
    return {name: mean_std(v) for name, v in shares.items() if v}


@torch.no_grad()
def order_probe(pipe: HARTPipeline, prompts: List[str], indices: Sequence[torch.Tensor],
                checked: Optional[List[str]] = None, batch_size: int = 32) -> Optional[Dict]:
    """Does the model bind colours to places? Teacher-forced CE of the real scenes' 2x2-scale tokens (the scale
    that decides the arrangement) under each two-colour relation prompt and under the same prompt with its two
    colour words swapped; ``order_accuracy``: the share of scenes the true prompt explains better (0.5: the
    colours are not bound to their places). ``checked``: what each prompt is scored as (a reworded set's originals;
    default the prompts). None without such prompts or without a 2x2-like second scale."""
    expectations = [parse_prompt(p) for p in (checked or prompts)]
    rows = [i for i, expect in enumerate(expectations) if expect.relation is not None and expect.two_colours]
    patch_nums = list(pipe.vae.config.patch_nums)
    if not rows or len(patch_nums) < 2:
        return None
    span = slice(patch_nums[0] ** 2, patch_nums[0] ** 2 + patch_nums[1] ** 2)  # the second scale's tokens
    ce = {"true": [], "swapped": []}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        given = [idx[chunk].to(pipe.transformer.device) for idx in indices]
        inputs = pipe.vae.quantizer.teacher_forcing_input(given, patch_nums)
        targets = torch.cat(given, dim=1)[:, span]
        swapped = [swap_colours(prompts[i], expectations[i]) for i in chunk]
        for key, texts in (("true", [prompts[i] for i in chunk]), ("swapped", swapped)):
            embeds, positions, _, _ = pipe.encode_prompt(texts)
            logits = pipe.transformer(embeds, positions, inputs.to(pipe.transformer.dtype), patch_nums).logits[:, span]
            ce[key].append(torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(1))
    true, swapped = torch.cat(ce["true"]), torch.cat(ce["swapped"])
    return {"num_scenes": len(rows), "scale": f"{patch_nums[1]}x{patch_nums[1]}", "ce_true": true.mean().item(),
            "ce_swapped": swapped.mean().item(), "order_accuracy": (true < swapped).float().mean().item()}


def teacher_forced(pipe: HARTPipeline, prompts: List[str], checked: List[str], indices: Sequence[torch.Tensor],
                   scales: Sequence[int], seeds: Sequence[int], guidance_scale: float) -> Dict[int, Dict]:
    """{K: {criterion: mean ± std over seeds}}: adherence (discrete decoding) when the first K scales are
    ``indices`` (per scale (N, pn^2), the real scenes' tokens) and the AR stage samples the others."""
    out = {}
    for k in scales:
        rows = []
        for seed in seeds:
            images = generate(pipe, prompts, seed, guidance_scale, prefix=indices[:k])["discrete_only"]
            rows.append(mean_scores([score_image(to_uint8(im), p) for im, p in zip(images, checked)]))
        out[k] = {c: mean_std([r[c] for r in rows]) for c in CRITERIA}
    return out


def evaluate(pipe: HARTPipeline, model_name: str, output_dir: str, num_prompts: int, seeds: Sequence[int],
             guidance_scale: float, num_images: int, vaes: Sequence[str] = (), sheet_prompts: int = 8,
             heldout_path: str = HELDOUT_PATH, teacher_forced_scales: Sequence[int] = ()) -> Dict:
    """Run the evaluations and write the contact sheet, ``report.md`` and ``report.json`` into ``output_dir``."""
    if len(seeds) < 1 or num_prompts < 1:
        raise ValueError("evaluate needs at least one sampling seed (--seeds) and one prompt (--num-prompts)")
    num_scales = len(pipe.vae.config.patch_nums)
    if any(not 0 <= k < num_scales for k in teacher_forced_scales):
        raise ValueError(f"--teacher-forced-scales must lie in [0, {num_scales - 1}] (the model has {num_scales} "
                         f"scales and samples at least the last); got {list(teacher_forced_scales)}")
    heldout = load_heldout(heldout_path)
    if num_prompts > len(heldout["prompts"]):
        raise ValueError(f"--num-prompts {num_prompts} exceeds the {len(heldout['prompts'])} held-out prompts")
    os.makedirs(output_dir, exist_ok=True)
    entries = heldout["prompts"][:num_prompts]
    prompts = [e["prompt"] for e in entries]  # what the model reads
    checked = [e.get("checked_as", e["prompt"]) for e in entries]  # what the checker scores (a reworded set's original)
    layouts = [e["layout"] for e in entries]
    size = pipe.default_size
    scenes = SyntheticShapesDataset(10 ** 7, size, heldout["data_seed"])
    items = [scenes.item(e["index"]) for e in entries]
    real = torch.stack([it.image for it in items])  # the real scenes of the prompts: ceilings and Fréchet reference
    if [it.caption for it in items] != checked:
        raise ValueError(f"{heldout_path} does not match SyntheticShapesDataset(seed={heldout['data_seed']}): rebuild it")

    start, per_seed, sheet = time.time(), {"with_residual": [], "discrete_only": []}, []
    frechet, outcomes = {"with_residual": [], "discrete_only": []}, []
    real_features = random_features(real)
    for seed in seeds:
        images = generate(pipe, prompts, seed, guidance_scale)
        for key, batch in images.items():
            per_seed[key].append([score_image(to_uint8(im), p) for im, p in zip(batch, checked)])
            frechet[key].append(frechet_distance(real_features, random_features(batch)))
        sheet.append([to_uint8(im) for im in images["with_residual"][:sheet_prompts]])
        outcomes.append([relation_outcome(to_uint8(im), p) for im, p in zip(images["with_residual"], checked)])
    seconds = (time.time() - start) / (len(prompts) * len(seeds))
    with torch.no_grad():
        real_tokens = pipe.vae.encode(real.to(pipe.vae.device, pipe.vae.dtype))  # also the teacher-forced prefixes
        recon = pipe.vae.decode(real_tokens.indices, real_tokens.residual).sample
    adherence = {key: {c: mean_std([mean_scores(scores)[c] for scores in rows]) for c in CRITERIA}
                 for key, rows in per_seed.items()}
    adherence["real_images"] = mean_scores([score_image(to_uint8(im), p) for im, p in zip(real, checked)])
    adherence["tokenizer_reconstructions"] = mean_scores([score_image(to_uint8(im), p) for im, p in zip(recon.float().cpu(), checked)])

    images = heldout_scenes(heldout["data_seed"], num_images, size)
    recon_rows = [reconstruction(HARTHybridTokenizer.from_pretrained(path), images) for path in vaes] or \
        [reconstruction(pipe.vae, images)]
    result = {
        "model": model_name, "heldout": heldout_path, "num_prompts": num_prompts, "layouts": layouts,
        "patch_nums": list(pipe.vae.config.patch_nums), "seeds": list(seeds),
        "guidance_scale": guidance_scale, "adherence": adherence,
        "residual_guidance": ("the final scale's (official)" if pipe.scheduler.config.guidance_scale is None
                              else pipe.scheduler.config.guidance_scale),
        "by_layout": adherence_by_layout(per_seed["with_residual"], layouts),
        "relation_outcomes": outcome_shares(outcomes),
        "order_probe": order_probe(pipe, prompts, real_tokens.indices, checked),
        "teacher_forced": teacher_forced(pipe, prompts, checked, real_tokens.indices, teacher_forced_scales, seeds,
                                         guidance_scale),
        "frechet": {key: mean_std(v) for key, v in frechet.items()},
        "reconstruction": {"num_images": num_images, "vaes": list(vaes) or [f"{model_name}/vae"],
                           **{k: mean_std([row[k] for row in recon_rows]) for k in recon_rows[0]}},
        "seconds_per_image": seconds,
    }
    contact_sheet([list(col) for col in zip(*sheet)], prompts[:sheet_prompts], [f"seed {s}" for s in seeds],
                  os.path.join(output_dir, "contact_sheet.png"))
    write_report(result, os.path.join(output_dir, "report.md"))
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def residual_guidance_arg(text: str):
    """``--residual-guidance``: 'model', 'official' or a number >= 0."""
    if text in ("model", "official"):
        return text
    try:
        return check_residual_guidance("--residual-guidance", float(text))
    except ValueError:  # not a number, or not a finite one >= 0
        raise argparse.ArgumentTypeError(f"expected 'model', 'official' or a number >= 0; got {text!r}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HART pipeline folder (default: the built-in model)")
    parser.add_argument("--output-dir", default="eval_out", help="where contact_sheet.png and report.md/json go")
    parser.add_argument("--num-prompts", type=int, default=48, help="first N of the 256 held-out prompts")
    parser.add_argument("--prompts-file", default=HELDOUT_PATH,
                        help="the held-out set (default heldout_prompts.json; reworded_prompts.json: the same scenes "
                             "in wordings the training captions never use)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (>= 3 for error bars)")
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--num-images", type=int, default=512, help="held-out images for the reconstruction figures")
    parser.add_argument("--vaes", nargs="+", default=[],
                        help="tokenizer folders for the reconstruction table (default: the model's own vae)")
    parser.add_argument("--sheet-prompts", type=int, default=8, help="prompts (rows) on the contact sheet")
    parser.add_argument("--teacher-forced-scales", type=int, nargs="*", default=[], metavar="K",
                        help="also measure adherence with the first K scales taken from the real scenes (e.g. 0 2 4 5)")
    parser.add_argument("--residual-guidance", default="model", metavar="G", type=residual_guidance_arg,
                        help="the residual stage's guidance: 'model' (the model's default, as the pipeline uses it), "
                             "'official' (the AR stage's final-scale guidance) or a number >= 0")
    parser.add_argument("--int8", action="store_true",
                        help="evaluate the opt-in int8 path (hart_pipeline.quantization.quantize_int8_: dynamic "
                             "int8 Linear layers in the transformer and the residual head)")
    args = parser.parse_args(argv)
    load = {"dtype": torch.float32} if args.int8 else {}
    pipe = load_default_pipeline(**load) if args.model is None else HARTPipeline.from_pretrained(args.model, **load)
    if args.int8:
        from hart_pipeline.quantization import quantize_int8_

        quantize_int8_(pipe)
    if args.residual_guidance != "model":  # 'official' -> None: the AR stage's final-scale guidance
        value = None if args.residual_guidance == "official" else args.residual_guidance
        pipe.scheduler = HARTResidualScheduler.from_config(pipe.scheduler.config, guidance_scale=value)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate(pipe, args.model or "built-in default model", args.output_dir, args.num_prompts, args.seeds,
                      args.guidance_scale, args.num_images, args.vaes, args.sheet_prompts,
                      heldout_path=args.prompts_file, teacher_forced_scales=args.teacher_forced_scales)
    with open(os.path.join(args.output_dir, "report.md")) as f:
        print(f.read())
    print(f"wrote {args.output_dir}/contact_sheet.png, report.md, report.json ({result['seconds_per_image']:.2f} s/image)")


if __name__ == "__main__":
    main()
