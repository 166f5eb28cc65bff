"""The ``hart`` command: ``hart generate`` (text to image) and ``hart convert`` (official -> diffusers).

Every argument is checked before a model is loaded; a bad one gives argparse's ``error:`` line (exit
status 2) naming the flag and the fix.
"""

import argparse
import contextlib
import os
import sys
from typing import Dict, List, Optional

MAX_SEED = 2**64 - 1
# the names of validation.DTYPE_NAMES (kept here so that parsing needs no torch; a test keeps them equal)
DTYPE_CHOICES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")
DEFAULT_STEPS_LIMIT = 1000  # the residual scheduler's num_train_timesteps when the folder does not say


def _read_json(path: str) -> Optional[dict]:
    from .validation import read_json_object

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


def _looks_like_a_path(model: str) -> bool:
    """A name no Hub id can be (user/name, no leading ./ or /, at most one slash), or an existing non-folder."""
    return (os.path.exists(model) or model.count("/") > 1 or model.startswith((".", "/", "~")) or "\\" in model
            or model.endswith("/"))


def validate_generate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, object]:
    """Check every ``hart generate`` argument before loading; exits with ``error:`` naming the flag."""
    import math

    if (args.prompt is None) == (args.prompts is None):
        parser.error("give either a PROMPT or --prompts FILE (with --out-dir DIR), not both or neither.")
    if args.prompts is None:
        if not args.prompt.strip():
            parser.error("argument PROMPT: the prompt is empty; give the text to draw, e.g. \"a red circle above a "
                         "blue square\".")
        _check_out(parser, args.out)
    elif not os.path.isfile(args.prompts):
        parser.error(f"argument --prompts: {args.prompts} is not a file (one prompt per line).")
    else:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                blank = not any(line.strip() for line in f)
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"argument --prompts: cannot read {args.prompts} as UTF-8 text ({e}).")
        if blank:
            parser.error(f"argument --prompts: {args.prompts} holds no prompt; write one prompt per line.")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
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
    if args.model is not None and not os.path.isdir(args.model) and _looks_like_a_path(args.model):
        parser.error(f"argument --model: there is no folder {args.model}; give a HART pipeline folder (one with "
                     "model_index.json) or a Hub id such as user/name.")
    if args.model is not None and os.path.isdir(args.model):
        index = _read_json(os.path.join(args.model, "model_index.json"))
        if index is None:
            parser.error(f"argument --model: {args.model} has no readable model_index.json; give a HART pipeline "
                         "folder (as `hart convert` or the trainer writes it).")
        if any(not (isinstance(index.get(part), list) and index[part][:1] != [None]
                    and os.path.isdir(os.path.join(args.model, part))) for part in ("text_encoder", "tokenizer")):
            parser.error(f"argument --model: {args.model} has no text encoder (text_encoder/ and tokenizer/), so "
                         "`hart generate` cannot read a prompt. Convert with `hart convert SRC DST --text-encoder "
                         "mit-han-lab/Qwen2-VL-1.5B-Instruct` (the released model's), or load it in Python with "
                         "HARTPipeline.from_pretrained(folder, text_encoder=..., tokenizer=...).")
    limits = folder_limits(args.model)
    if not 2 <= args.steps <= limits["max_steps"]:
        parser.error(f"argument --steps: residual diffusion steps must be in [2, {limits['max_steps']}] (official 8); "
                     f"got {args.steps}.")
    if args.size is not None and (args.size < 1 or (limits["sizes"] is not None and args.size not in limits["sizes"])):
        valid = ", ".join(map(str, limits["sizes"])) if limits["sizes"] else "a positive size"
        parser.error(f"argument --size: this model generates square images of side {valid}; got {args.size}.")
    if args.int8:
        if args.dtype not in (None, "float32", "fp32"):
            parser.error(f"argument --int8: the int8 layers take float32 activations; leave --dtype out "
                         f"(got {args.dtype}).")
    from .validation import check_device  # (imports torch: after every check that needs none)

    try:
        device = check_device("--device", args.device) if args.device is not None else None
    except ValueError as e:
        parser.error(f"argument --device: {str(e).replace('`--device`: ', '')}")
    return {"device": device, "sizes": limits["sizes"]}


# Loggers that print on import when an optional package is installed but cannot load on this machine (torchao's
# CUDA-only libraries on a CPU torch, and what that makes torch / diffusers say), and diffusers' torchao quantizer,
# which says at load that int8 needs bfloat16 (the int8 layers run with float32 activations): not this command's
# business.
LIBRARY_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextlib.contextmanager
def quiet_library_noise():
    """Errors only from :data:`LIBRARY_NOISE` while the libraries are imported and the model loads."""
    import logging

    loggers = [logging.getLogger(name) for name in LIBRARY_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    checked = validate_generate_args(parser, args)

    with quiet_library_noise():
        import diffusers
        import torch
        import transformers

        from .pipeline_hart import HARTPipeline
        from .validation import DTYPE_NAMES

    if checked["device"] is None and args.prompts:  # under `accelerate launch`, each process takes its own device
        from accelerate import PartialState

        checked["device"] = PartialState().device
    device = checked["device"] or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.int8:
        import importlib.util

        from .quantization import cpu_int8_problem

        problem = cpu_int8_problem() if device.type == "cpu" else None
        if problem is not None:
            parser.error(f"argument --int8: {problem}.")
        if device.type != "cpu" and importlib.util.find_spec("torchao") is None:
            parser.error("argument --int8: int8 on CUDA needs torchao; `pip install torchao`, or leave --int8 out.")
        dtype = torch.float32
    diffusers.utils.logging.disable_progress_bar()  # one progress bar: the generation's
    transformers.utils.logging.disable_progress_bar()
    if args.model is None:
        from .default_model import load_default_pipeline

        with quiet_library_noise():
            pipe = load_default_pipeline(dtype)
    else:
        try:
            with quiet_library_noise():
                pipe = HARTPipeline.from_pretrained(args.model, dtype=dtype)
        except OSError as e:
            if os.path.isdir(args.model):
                raise
            said = str(e).replace(" Please check out the root cause in the stacktrace above.", "")
            raise OSError(f"--model {args.model}: no such folder here, and no Hub repo of that name could be loaded "
                          "(offline without a cached copy, a mistyped id, or a private repo: run `hf auth login` "
                          f"first). Check the name; a Hub id looks like user/name. The Hub said: {said}") from None
    pipe.to(device)
    if args.int8:
        from .quantization import quantize_int8_

        with quiet_library_noise():
            quantize_int8_(pipe)
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
    with quiet_library_noise():
        from .convert import run

    run(args)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line arguments (``hart convert`` and ``python -m hart_pipeline.convert``)."""
    parser.add_argument("src", help="official checkpoint folder (with llm/ and tokenizer/) or its llm/ folder")
    parser.add_argument("dst", help="output folder (diffusers layout; created if missing)")
    parser.add_argument("--ema", dest="ema", action="store_true", default=True, help="use llm/ema_model.bin (default)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use llm/pytorch_model.bin instead")
    parser.add_argument("--text-encoder", help="Qwen2 text model folder or Hub id to include in the pipeline")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this Hub repo")


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
                     help="square image side (default: the size the model was trained at, 64 for the built-in model; other "
                          "HART sizes run with a warning: a model draws well only at the sizes it was trained for)")
    gen.add_argument("--steps", type=int, default=8, help="residual diffusion steps, 2 to 1000 (default: 8, official)")
    gen.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale >= 0 (default: 4.5, official)")
    gen.add_argument("--residual-cfg", type=float, default=None,
                     help="guidance of the residual stage >= 0 (default: the model's; the built-in model's is 0, the "
                          "released model's the final scale's guidance, official)")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt (default: 1)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    gen.add_argument("--int8", action="store_true",
                     help="int8 Linear layers in the transformer and residual head (oneDNN on the CPU, torchao on "
                          "CUDA; on a CPU with AMX / VNNI several times faster per layer, refused on one without: "
                          "no faster there; not exact: the image changes a little; weights stay float32 elsewhere)")
    gen.add_argument("--dtype", choices=DTYPE_CHOICES, help="weights dtype (default: bfloat16 on CUDA, float32 otherwise)")
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
