"""Small-scale counterparts of the HART paper's Table 1 / Table 5 on the synthetic shapes domain.

1. Tokenizer reconstruction, discrete-only vs hybrid: PSNR, and a Fréchet distance between features of
   real and reconstructed images (features of a fixed, seeded random CNN: a network available offline;
   absolute values are not comparable to Inception FID, the discrete/hybrid comparison is).
2. Prompt adherence of generations, with and without the residual stage, measured programmatically on
   held-out captions whose scene layout is known: is each asked colour present, is each object where
   the caption puts it (left/right/top/bottom/center or relative to the other object), is the count right.

    python examples/eval/evaluate.py                     # the built-in default model
    python examples/eval/evaluate.py --model runs/hart   # a trained pipeline folder
"""

import argparse
import json
import time

import numpy as np
import torch

from hart_pipeline import HARTPipeline, add_residual, decode_tokens, generate_tokens
from hart_pipeline.default_model import load_default_pipeline
from hart_pipeline.training.data import BACKGROUNDS, COLOURS, SyntheticShapesDataset, collate


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
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@torch.no_grad()
def reconstruction(pipe: HARTPipeline, images: torch.Tensor) -> dict:
    vae = pipe.vae
    tokens = vae.encode(images.to(vae.device, vae.dtype))
    discrete = vae.decode(tokens.indices).sample.float().cpu()
    hybrid = vae.decode(tokens.indices, tokens.residual).sample.float().cpu()
    real = random_features(images)
    return {
        "psnr_discrete": psnr(discrete, images), "psnr_hybrid": psnr(hybrid, images),
        "fd_discrete": frechet_distance(real, random_features(discrete)),
        "fd_hybrid": frechet_distance(real, random_features(hybrid)),
    }


PALETTE = list(COLOURS) + [f"background{i}" for i in range(len(BACKGROUNDS))]
PALETTE_RGB = np.array(list(COLOURS.values()) + list(BACKGROUNDS), dtype=np.float64)


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """Pixels (H, W) whose nearest palette entry (the dataset's colours and backgrounds) is ``colour``."""
    nearest = np.linalg.norm(image.astype(np.float64)[:, :, None] - PALETTE_RGB, axis=-1).argmin(-1)
    return nearest == PALETTE.index(colour)


def components(mask: np.ndarray, min_pixels: int) -> int:
    """Number of 4-connected blobs of at least ``min_pixels`` pixels."""
    seen, count = np.zeros_like(mask, dtype=bool), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= min_pixels
    return count


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def mean_scores(rows) -> dict:
    return {m: float(np.mean([r[m] for r in rows])) for m in ("colour", "position", "count")}


def adherence(image: np.ndarray, attributes) -> dict:
    """Colour / position / count checks of one (H, W, 3) uint8 image against its scene attributes."""
    size = image.shape[0]
    min_pixels = max(4, size * size // 400)
    colour_ok, position_ok, centres = [], [], []
    for shape, colour, cx, cy in attributes:
        mask = colour_mask(image, colour)
        found = mask.sum() >= min_pixels
        colour_ok.append(found)
        if found:
            ys, xs = np.nonzero(mask)
            centre = (xs.mean() / size, ys.mean() / size)
            position_ok.append(abs(centre[0] - cx) < 0.25 and abs(centre[1] - cy) < 0.25)
        else:
            position_ok.append(False)
    colours = {a[1] for a in attributes}
    count_ok = all(components(colour_mask(image, c), min_pixels) == sum(a[1] == c for a in attributes)
                   for c in colours)
    return {"colour": float(np.mean(colour_ok)), "position": float(np.mean(position_ok)), "count": float(count_ok)}


@torch.no_grad()
def generation(pipe: HARTPipeline, items, seed: int, guidance_scale: float) -> dict:
    scores = {"with_residual": [], "discrete_only": []}
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for item in items:
        embeds, positions, _, _ = pipe.encode_prompt(item["caption"])
        tokens = generate_tokens(pipe.transformer, pipe.vae, embeds, positions, guidance_scale=guidance_scale, generator=g)
        tokens = add_residual(tokens, pipe.residual_head, pipe.scheduler, generator=g)
        for key, discrete_only in (("with_residual", False), ("discrete_only", True)):
            image = decode_tokens(pipe.vae, tokens, discrete_only=discrete_only)[0]
            scores[key].append(adherence(to_uint8(image), item["attributes"]))
    result = {key: mean_scores(rows) for key, rows in scores.items()}
    # ceilings: the checker on the real images and on the tokenizer's hybrid reconstructions of them
    real = torch.stack([item["image"] for item in items])
    recon = pipe.vae.decode(*pipe.vae.encode(real.to(pipe.vae.device, pipe.vae.dtype), return_dict=False)).sample
    result["real_images"] = mean_scores([adherence(to_uint8(im * 0.5 + 0.5), it["attributes"]) for im, it in zip(real, items)])
    result["tokenizer_reconstructions"] = mean_scores(
        [adherence(to_uint8(im * 0.5 + 0.5), it["attributes"]) for im, it in zip(recon, items)])
    result["seconds_per_image"] = (time.time() - start) / len(items)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HART pipeline folder (default: the built-in model)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--data-seed", type=int, default=12345, help="held-out data (training used seeds 0 and 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    args = parser.parse_args(argv)
    pipe = load_default_pipeline() if args.model is None else HARTPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_size
    data = SyntheticShapesDataset(max(args.num_images, args.num_prompts), size, args.data_seed)
    images = collate([data[i] for i in range(args.num_images)])["image"]
    report = {"reconstruction": reconstruction(pipe, images),
              "adherence": generation(pipe, [data[i] for i in range(args.num_prompts)], args.seed, args.guidance_scale)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
