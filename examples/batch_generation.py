"""Several prompts, several images per prompt, one call; the same generator seed reproduces the batch.

    python examples/batch_generation.py [--model PATH_OR_REPO]
"""

import argparse

import torch

from hart_pipeline import HARTPipeline
from hart_pipeline.default_model import load_default_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_default_pipeline() if args.model is None else HARTPipeline.from_pretrained(args.model)
pipe.to(device)

prompts = ["a red circle above a blue square", "two green triangles", "a yellow square on the left"]
images = pipe(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
for i, image in enumerate(images):
    image.save(f"batch_{i // 2}_{i % 2}.png")
print(f"saved {len(images)} images")
