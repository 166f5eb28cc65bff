"""Quick checks of trained components: tokenizer PSNR (hybrid vs discrete-only) and text-to-image samples.

    python -m hart_pipeline.training.evaluate --model_dir hart_pipeline/default_model \
        --prompt "a red circle above a blue square" --out sample.png
"""

import argparse
import json
import os
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

from ..models.residual_head import HARTResidualHead
from ..models.tokenizer import HARTHybridTokenizer
from ..models.transformer import HARTTransformer
from ..sampling import add_residual, decode_tokens, generate_tokens
from ..scheduler import HARTResidualScheduler
from .data import SyntheticShapesDataset, collate
from .text import encode_captions, load_text_encoder


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1], computed per image on the [0, 1] range."""
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def reconstruction_psnr(tokenizer: HARTHybridTokenizer, images: torch.Tensor) -> Dict[str, float]:
    """{'hybrid': PSNR of decode(indices, residual), 'discrete': PSNR of decode(indices)}."""
    enc = tokenizer.encode(images)
    hybrid = tokenizer.decode(enc.indices, enc.residual).sample
    discrete = tokenizer.decode(enc.indices).sample
    return {"hybrid": psnr(hybrid, images), "discrete": psnr(discrete, images)}


@torch.no_grad()
def sample(model_dir: str, prompts: List[str], seed: int = 0, guidance_scale: float = 4.5, top_k: int = 0,
           smooth: bool = True, residual_steps: int = 8, text=None) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) from a trained model folder (vae, transformer, residual_head, scheduler)."""
    tokenizer = HARTHybridTokenizer.from_pretrained(os.path.join(model_dir, "vae")).eval()
    transformer = HARTTransformer.from_pretrained(os.path.join(model_dir, "transformer")).eval()
    head = HARTResidualHead.from_pretrained(os.path.join(model_dir, "residual_head")).eval()
    scheduler = HARTResidualScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))
    tok, enc = text or load_text_encoder()
    context, position_ids = encode_captions(tok, enc, prompts, transformer.config.context_tokens)
    g = torch.Generator().manual_seed(seed)
    tokens = generate_tokens(transformer, tokenizer, context, position_ids, guidance_scale=guidance_scale,
                             top_k=top_k, smooth=smooth, generator=g)
    tokens = add_residual(tokens, head, scheduler, num_inference_steps=residual_steps, generator=g)
    return decode_tokens(tokenizer, tokens)


def to_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """(B, 3, H, W) in [0, 1] -> a PIL grid."""
    B, _, H, W = images.shape
    ncol = (B + nrow - 1) // nrow
    grid = np.zeros((ncol * H, nrow * W, 3), dtype=np.uint8)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = arr[i]
    return Image.fromarray(grid)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--num_per_prompt", type=int, default=4)
    p.add_argument("--out", default="sample.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=4.5)
    p.add_argument("--psnr_images", type=int, default=64)
    p.add_argument("--psnr_seed", type=int, default=12345, help="data seed of the held-out images")
    p.add_argument("--num_threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    prompts = args.prompt or ["a red circle above a blue square"]
    images = sample(args.model_dir, [q for q in prompts for _ in range(args.num_per_prompt)], args.seed,
                    args.guidance_scale)
    to_grid(images, args.num_per_prompt).resize((images.shape[-1] * args.num_per_prompt * 2,
                                                 images.shape[-2] * len(prompts) * 2), Image.NEAREST).save(args.out)
    result = {"sample": args.out}
    if args.psnr_images > 0:
        tokenizer = HARTHybridTokenizer.from_pretrained(os.path.join(args.model_dir, "vae")).eval()
        data = SyntheticShapesDataset(args.psnr_images, images.shape[-1], args.psnr_seed)
        batch = collate([data[i] for i in range(len(data))])
        result["psnr"] = reconstruction_psnr(tokenizer, batch["image"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
