"""Editing by teacher forcing with the built-in model: variations, inpainting, outpainting.

    python examples/editing.py [--out-dir editing] [--model path/to/hart-pipeline-folder]

Writes three sheets (each row: the inputs, then one result per seed, shown 4x larger):
* variation.png   HARTImg2ImgPipeline: a rendered scene re-sampled under a new prompt at strength 0.3 / 0.6 / 1.0;
* inpainting.png  HARTInpaintPipeline: the right half of a scene repainted, with and without blending;
* outpainting.png HARTInpaintPipeline on a padded canvas (outpaint_canvas): a small scene extended outwards,
                  at strength 0.7 (the two coarsest scales kept) and 1.0.
The built-in model only knows coloured shapes on dark backgrounds (64 px), so use prompts of that kind; its
small tokenizer reconstructs some colours loosely (yellow comes back orange, navy nearly black), so the kept
parts look like the reconstruction, not the input, unless blend_original=True pastes the input back.
"""

import argparse
import os
from typing import List

import PIL.Image
import torch

from hart_pipeline import HARTImg2ImgPipeline, HARTInpaintPipeline, HARTPipeline, outpaint_canvas
from hart_pipeline.default_model import load_default_pipeline
from hart_pipeline.training.data import render

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a HART pipeline folder or Hub repo (default: the built-in model)")
parser.add_argument("--out-dir", default="editing")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
args = parser.parse_args()
os.makedirs(args.out_dir, exist_ok=True)

pipe = load_default_pipeline() if args.model is None else HARTPipeline.from_pretrained(args.model)
side = pipe.default_size
img2img = HARTImg2ImgPipeline.from_pipe(pipe)
inpaint = HARTInpaintPipeline.from_pipe(pipe)
for p in (pipe, img2img, inpaint):
    p.set_progress_bar_config(disable=True)


def sheet(rows: List[List[PIL.Image.Image]], path: str, zoom: int = 4) -> None:
    width = max(len(r) for r in rows)
    out = PIL.Image.new("RGB", (width * side * zoom, len(rows) * side * zoom), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            out.paste(img.convert("RGB").resize((side * zoom, side * zoom), PIL.Image.NEAREST), (x * side * zoom, y * side * zoom))
    out.save(path)
    print("saved", path)


def seeds(call) -> List[PIL.Image.Image]:
    return [call(torch.Generator().manual_seed(s)).images[0] for s in args.seeds]


# Variation: keep the coarse scales of a rendered scene, re-sample the rest under another prompt.
scene = render([("circle", "red", 0.3, 0.5), ("square", "blue", 0.7, 0.5)], side, 0.16, (15, 20, 45))
rows = []
for strength in (0.3, 0.6, 1.0):
    rows.append([scene] + seeds(lambda g: img2img("a red circle left of a green square", image=scene, strength=strength,
                                                  generator=g)))
sheet(rows, os.path.join(args.out_dir, "variation.png"))

# Inpainting: repaint the right half (white = repaint); the left keeps the image's tokens at every scale.
mask = PIL.Image.new("L", (side, side), 0)
mask.paste(255, (side // 2, 0, side, side))
prompt = "a red circle left of a yellow triangle"
rows = [[scene, mask] + seeds(lambda g: inpaint(prompt, image=scene, mask_image=mask, generator=g)),
        [scene, mask] + seeds(lambda g: inpaint(prompt, image=scene, mask_image=mask, blend_original=True, generator=g))]
sheet(rows, os.path.join(args.out_dir, "inpainting.png"))

# Outpainting: a scene's centre on a larger canvas (its border pixels extended), the border painted. The first
# scales are kept everywhere (strength < 1): they carry the global colours, which the prompt alone cannot know.
small = render([("triangle", "yellow", 0.5, 0.5)], side // 2, 0.3, (15, 20, 45))
canvas, border = outpaint_canvas(small, side)
rows = [[canvas, border] + seeds(lambda g: inpaint("a yellow triangle in the center", image=canvas, mask_image=border,
                                                  strength=strength, generator=g))
        for strength in (0.7, 1.0)]
sheet(rows, os.path.join(args.out_dir, "outpainting.png"))
