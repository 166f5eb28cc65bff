"""The ``hart`` command: ``hart generate`` (text to image) and ``hart convert`` (official -> diffusers).

Every argument is checked before a model is loaded; a bad one gives argparse's ``error:`` line (exit
status 2) naming the flag and the fix.
"""

import argparse
import os
import sys
from typing import Dict, List, Optional

from .convert import add_arguments as add_convert_arguments
from .validation import DTYPE_NAMES, check_device, read_json_object

MAX_SEED = 2**64 - 1
DEFAULT_STEPS_LIMIT = 1000  # the residual scheduler's num_train_timesteps when the folder does not say


def _read_json(path: str) -> Optional[dict]:
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return None


def folder_limits(model: Optional[str]) -> Dict[str, object]:
    """What a local pipeline folder supports, read from its small config files without loading weights.

    Returns ``{"sizes": [...], "max_steps": int}``; ``sizes`` is None when unknown (a Hub id or a broken
    folder: the loader then reports the problem and the size is checked right after loading).
    """
    from .default_model import DEFAULT_MODEL_DIR
    from .schedules import supported_sizes

    folder = str(DEFAULT_MODEL_DIR) if model is None else model
    transformer = _read_json(os.path.join(folder, "transformer", "config.json")) or {}
    vae = _read_json(os.path.join(folder, "vae", "config.json")) or {}
    scheduler = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json")) or {}
    steps = scheduler.get("num_train_timesteps")
    limits = {"sizes": None, "max_steps": steps if isinstance(steps, int) and steps >= 2 else DEFAULT_STEPS_LIMIT}
    patch_nums, multipliers = transformer.get("patch_nums"), vae.get("channel_multipliers")
    if (isinstance(patch_nums, list) and patch_nums and all(isinstance(p, int) for p in patch_nums)
            and isinstance(multipliers, list) and multipliers):
        limits["sizes"] = sorted(supported_sizes(patch_nums, 2 ** (len(multipliers) - 1)))
    return limits


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    from PIL import Image

    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    ext = os.path.splitext(out)[1].lower()
    if os.path.isdir(out):
        parser.error(f"argument --out: {out} is a folder; give a file name such as {os.path.join(out, 'image.png')}.")
    if ext not in writable:
        common = ", ".join(e for e in (".png", ".jpg", ".webp", ".bmp", ".tiff") if e in writable)
        problem = f"the extension {ext}, which no image writer knows" if ext else "no file extension"
        parser.error(f"argument --out: {out!r} has {problem}; end it with one of {common} (e.g. image.png).")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        parser.error(f"argument --out: the folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        parser.error(f"argument --out: the folder {parent} is not writable.")


def validate_generate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, object]:
    """Check every ``hart generate`` argument before loading; exits with ``error:`` naming the flag."""
    import math

    if (args.prompt is None) == (args.prompts is None):
        parser.error("give either a PROMPT or --prompts FILE (with --out-dir DIR), not both or neither.")
    if args.prompts is None:
        _check_out(parser, args.out)
    elif not os.path.isfile(args.prompts):
        parser.error(f"argument --prompts: {args.prompts} is not a file (one prompt per line).")
    elif os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"argument --out-dir: {args.out_dir} exists and is not a folder.")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"argument --seed: must be in [0, 2**64 - 1]; got {args.seed}.")
    if args.num_images < 1:
        parser.error(f"argument --num-images: must be >= 1; got {args.num_images}.")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        parser.error(f"argument --cfg: must be a finite number >= 0 (0 disables guidance, 4.5 is official); got {args.cfg}.")
    if args.residual_cfg is not None and (not math.isfinite(args.residual_cfg) or args.residual_cfg < 0):
        parser.error(f"argument --residual-cfg: must be a finite number >= 0 (0 = no guidance in the residual stage; "
                     f"leave it out for the model's default); got {args.residual_cfg}.")
    if args.model is not None and not os.path.isdir(args.model) and (os.path.exists(args.model) or args.model.count("/") > 1):
        parser.error(f"argument --model: {args.model} is neither a pipeline folder nor a Hub id (user/name).")
    limits = folder_limits(args.model)
    if not 2 <= args.steps <= limits["max_steps"]:
        parser.error(f"argument --steps: residual diffusion steps must be in [2, {limits['max_steps']}] (official 8); "
                     f"got {args.steps}.")
    if args.size is not None and (args.size < 1 or (limits["sizes"] is not None and args.size not in limits["sizes"])):
        valid = ", ".join(map(str, limits["sizes"])) if limits["sizes"] else "a positive size"
        parser.error(f"argument --size: this model generates square images of side {valid}; got {args.size}.")
    try:
        device = check_device("--device", args.device) if args.device is not None else None
    except ValueError as e:
        parser.error(f"argument --device: {str(e).replace('`--device`: ', '')}")
    return {"device": device, "sizes": limits["sizes"]}


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    checked = validate_generate_args(parser, args)

    import diffusers
    import torch
    import transformers

    from .pipeline_hart import HARTPipeline

    if checked["device"] is None and args.prompts:  # under `accelerate launch`, each process takes its own device
        from accelerate import PartialState

        checked["device"] = PartialState().device
    device = checked["device"] or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    diffusers.utils.logging.disable_progress_bar()  # one progress bar: the generation's
    transformers.utils.logging.disable_progress_bar()
    if args.model is None:
        from .default_model import load_default_pipeline

        pipe = load_default_pipeline(dtype)
    else:
        pipe = HARTPipeline.from_pretrained(args.model, dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(desc="hart generate")
    size = args.size or pipe.default_size
    if size not in pipe.supported_sizes:  # a Hub model: its sizes are known once loaded
        parser.error(f"argument --size: this model generates square images of side "
                     f"{', '.join(map(str, sorted(pipe.supported_sizes)))}; got {size}.")
    if args.prompts:
        from .distributed import generate_from_file

        for path in generate_from_file(pipe, args.prompts, args.out_dir, seed=args.seed, height=size, width=size,
                                       num_inference_steps=args.steps, guidance_scale=args.cfg,
                                       residual_guidance_scale=args.residual_cfg):
            print(path)
        return
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(args.prompt, height=size, width=size, num_inference_steps=args.steps, guidance_scale=args.cfg,
                  residual_guidance_scale=args.residual_cfg, num_images_per_prompt=args.num_images,
                  generator=generator).images
    root, ext = os.path.splitext(args.out)
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else f"{root}_{i}{ext}"
        image.save(path)
        print(path)


def _convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .convert import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hart", description="HART text-to-image (diffusers).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image from a prompt",
                         description="Generate images from a text prompt (default: the built-in 64px model, CPU).")
    gen.add_argument("prompt", nargs="?", help="the text prompt, e.g. \"a red circle above a blue square\"")
    gen.add_argument("--prompts", metavar="FILE", help="instead of PROMPT: one prompt per line; image i -> "
                     "OUT_DIR/{i:05d}.png with seed SEED + i (split over the processes of `accelerate launch`)")
    gen.add_argument("--out-dir", default="images", help="output folder for --prompts (default: images)")
    gen.add_argument("--model", help="HART pipeline folder or Hub id (default: the built-in small model)")
    gen.add_argument("--out", default="image.png",
                     help="output image file, .png/.jpg/.webp ... (several images get _0, _1, ... suffixes; default: image.png)")
    gen.add_argument("--seed", type=int, default=0, help="random seed in [0, 2**64 - 1]; the same seed gives the same image")
    gen.add_argument("--size", type=int,
                     help="square image side (default: the model's native size; the built-in model: 64, 128, 256, 512)")
    gen.add_argument("--steps", type=int, default=8, help="residual diffusion steps, 2 to 1000 (default: 8, official)")
    gen.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale >= 0 (default: 4.5, official)")
    gen.add_argument("--residual-cfg", type=float, default=None,
                     help="guidance of the residual stage >= 0 (default: the model's; the built-in model's is 0, the "
                          "released model's the final scale's guidance, official)")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt (default: 1)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="weights dtype (default: bfloat16 on CUDA, float32 otherwise)")
    gen.set_defaults(func=_generate, parser=gen)

    conv = sub.add_parser("convert", help="convert an official HART checkpoint to a diffusers folder",
                          description="Convert an official HART checkpoint (llm/ + tokenizer/) to a diffusers pipeline folder.")
    add_convert_arguments(conv)
    conv.set_defaults(func=_convert, parser=conv)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args.parser, args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
