"""Run the released 1024px model on a small GPU: every component is moved to the GPU only while it runs.

    python examples/cpu_offload.py --model path/to/hart-0.7b-1024px-diffusers
"""

import argparse

import torch

from hart_pipeline import HARTPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--prompt", default="a lemur in a magician hat")
args = parser.parse_args()

pipe = HARTPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
pipe.enable_model_cpu_offload()  # order: text_encoder -> transformer -> residual_head -> vae
image = pipe(args.prompt, generator=torch.Generator().manual_seed(0)).images[0]
image.save("offload.png")
print("peak GPU memory: %.2f GiB" % (torch.cuda.max_memory_allocated() / 2**30))
