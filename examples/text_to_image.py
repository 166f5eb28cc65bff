"""Text to image with a HART pipeline folder or Hub repo.

    python examples/text_to_image.py --model path/to/hart-0.7b-1024px-diffusers --prompt "a lemur in a magician hat"

Without --model the built-in small default model is used (CPU friendly).
"""

import argparse

import torch

from hart_pipeline import HARTPipeline
from hart_pipeline.default_model import load_default_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--prompt", default="a red circle above a blue square")
parser.add_argument("--out", default="hart.png")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = load_default_pipeline(dtype=dtype) if args.model is None else HARTPipeline.from_pretrained(args.model, dtype=dtype)
pipe.to(device)

image = pipe(args.prompt, guidance_scale=4.5, num_inference_steps=8, generator=torch.Generator().manual_seed(args.seed)).images[0]
image.save(args.out)
print("saved", args.out)
