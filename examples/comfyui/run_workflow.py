"""Run an API-format HART example workflow without a ComfyUI server, with the pack's own node functions.

    python examples/comfyui/run_workflow.py tests/workflows/text_to_image_api.json --out-dir out/
    python examples/comfyui/run_workflow.py --thumbnails     # example_workflows/<name>.jpg of every example

ComfyUI's core nodes the examples use are re-implemented here after ComfyUI's own semantics (``LoadImage``: RGB in
[0, 1] as (1, H, W, 3) plus the inverted alpha as mask, (64, 64) zeros without alpha; ``LoadImageMask``: one channel
in [0, 1], alpha inverted; ``ImagePadForOutpaint``: a 0.5-grey border, mask 1 there, without feathering;
``SaveImage`` / ``PreviewImage``: collect the images). Images are read from ``example_workflows/`` (what the pack
copies into ComfyUI's ``input/``). The same graphs run in a real ComfyUI in ``tests/test_comfyui_integration.py``.
"""

import argparse
import json
import os
import sys
from typing import Callable, Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
EXAMPLES = os.path.join(ROOT, "example_workflows")
WORKFLOWS = os.path.join(ROOT, "tests", "workflows")


def load_image(image: str):
    from PIL import Image

    picture = Image.open(os.path.join(EXAMPLES, image))
    rgb = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]
    if "A" in picture.getbands():
        mask = 1.0 - torch.from_numpy(np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0)
    else:
        mask = torch.zeros(64, 64)
    return rgb, mask[None]


def load_image_mask(image: str, channel: str):
    from PIL import Image

    picture = Image.open(os.path.join(EXAMPLES, image)).convert("RGBA")
    band = channel[0].upper()
    mask = torch.from_numpy(np.asarray(picture.getchannel(band), dtype=np.float32) / 255.0)
    return ((1.0 - mask) if band == "A" else mask)[None],


def pad_for_outpaint(image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int):
    if feathering:
        raise NotImplementedError("feathering > 0 is ComfyUI's own; the examples use 0")
    b, h, w, c = image.shape
    canvas = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
    canvas[:, top:top + h, left:left + w] = image
    mask = torch.ones(h + top + bottom, w + left + right)
    mask[top:top + h, left:left + w] = 0
    return canvas, mask[None]


def core_nodes(saved: Dict[str, List[torch.Tensor]]) -> Dict[str, Callable]:
    def save(images, filename_prefix="ComfyUI"):
        saved.setdefault(filename_prefix, []).append(images)
        return ()

    return {"LoadImage": lambda image: load_image(image), "LoadImageMask": load_image_mask,
            "ImagePadForOutpaint": pad_for_outpaint, "SaveImage": save,
            "PreviewImage": lambda images: save(images, "preview")}


def run(prompt: dict) -> Dict[str, List[torch.Tensor]]:
    """Execute an API prompt ``{id: {class_type, inputs}}``; returns the saved images by filename prefix."""
    from comfy_nodes.nodes import SPECS_BY_ID

    saved: Dict[str, List[torch.Tensor]] = {}
    core = core_nodes(saved)
    outputs: Dict[str, tuple] = {}

    def output(node_id: str) -> tuple:
        if node_id not in outputs:
            node = prompt[node_id]
            kwargs = {name: output(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in node["inputs"].items()}
            kind = node["class_type"]
            function = core[kind] if kind in core else SPECS_BY_ID[kind].function
            outputs[node_id] = tuple(function(**kwargs))
        return outputs[node_id]

    for node_id in prompt:
        output(node_id)
    return saved


def thumbnails(size: int = 256) -> List[str]:
    """``example_workflows/<name>.jpg`` (ComfyUI's template thumbnails): each example's first saved image."""
    from PIL import Image

    written = []
    for file in sorted(os.listdir(WORKFLOWS)):
        name = file[:-len("_api.json")]
        with open(os.path.join(WORKFLOWS, file)) as f:
            saved = run(json.load(f))
        prefix = next(k for k in saved if k != "preview")
        image = (saved[prefix][0][0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        path = os.path.join(EXAMPLES, f"{name}.jpg")
        Image.fromarray(image).resize((size, size), Image.NEAREST).save(path, quality=90)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", nargs="?", help="an API-format workflow (tests/workflows/*_api.json)")
    parser.add_argument("--out-dir", default=".", help="where the saved images go (PREFIX_00000.png)")
    parser.add_argument("--thumbnails", action="store_true", help="write example_workflows/<name>.jpg for every example")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.thumbnails:
        print("\n".join(thumbnails()))
        return
    if not args.workflow:
        parser.error("give an API workflow file, or --thumbnails")
    from PIL import Image

    with open(args.workflow) as f:
        saved = run(json.load(f))
    os.makedirs(args.out_dir, exist_ok=True)
    for prefix, batches in saved.items():
        for i, image in enumerate(torch.cat(batches)):
            path = os.path.join(args.out_dir, f"{prefix}_{i:05d}.png")
            Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
            print(path)


if __name__ == "__main__":
    main()
