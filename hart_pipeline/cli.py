"""The ``hart`` command: ``hart generate`` (text to image) and ``hart convert`` (official -> diffusers)."""

import argparse
import os
import sys
from typing import List, Optional

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _generate(args: argparse.Namespace) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*torch_dtype.*")  # diffusers >= 0.36 renames it `dtype`

    from .pipeline_hart import HARTPipeline

    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give either a PROMPT or --prompts FILE (with --out-dir DIR)")
    if args.prompts:  # under `accelerate launch`, each process takes its own device
        from accelerate import PartialState

        args.device = args.device or str(PartialState().device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.model is None:
        from .default_model import load_default_pipeline

        pipe = load_default_pipeline(torch_dtype=dtype)
    else:
        pipe = HARTPipeline.from_pretrained(args.model, torch_dtype=dtype)
    pipe.to(device)
    size = args.size or pipe.default_size
    if args.prompts:
        from .distributed import generate_from_file

        for path in generate_from_file(pipe, args.prompts, args.out_dir, seed=args.seed, height=size, width=size,
                                       num_inference_steps=args.steps, guidance_scale=args.cfg):
            print(path)
        return
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(args.prompt, height=size, width=size, num_inference_steps=args.steps, guidance_scale=args.cfg,
                  num_images_per_prompt=args.num_images, generator=generator).images
    root, ext = os.path.splitext(args.out)
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else f"{root}_{i}{ext or '.png'}"
        image.save(path)
        print(path)


def _convert(args: argparse.Namespace) -> None:
    from .convert import main as convert_main

    convert_main([args.src, args.dst] + ([] if args.ema else ["--no-ema"])
                 + (["--text-encoder", args.text_encoder] if args.text_encoder else [])
                 + (["--push-to-hub", args.push_to_hub] if args.push_to_hub else []))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="hart", description="HART text-to-image (diffusers).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt", nargs="?")
    gen.add_argument("--prompts", metavar="FILE", help="one prompt per line: image i -> OUT_DIR/{i:05d}.png, seed + i "
                     "(split over the processes of `accelerate launch`)")
    gen.add_argument("--out-dir", default="images", help="output folder for --prompts")
    gen.add_argument("--model", help="HART pipeline folder or Hub id (default: the built-in small model)")
    gen.add_argument("--out", default="image.png", help="output PNG (several images get _0, _1, ... suffixes)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, help="square image side (default: the model's native size)")
    gen.add_argument("--steps", type=int, default=8, help="residual diffusion steps")
    gen.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="convert an official HART checkpoint to a diffusers folder")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--no-ema", dest="ema", action="store_false", default=True)
    conv.add_argument("--text-encoder")
    conv.add_argument("--push-to-hub", metavar="REPO_ID")
    conv.set_defaults(func=_convert)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
