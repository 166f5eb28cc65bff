"""Run a HART model on a small GPU: every component is moved to the GPU only while it runs.

    python examples/cpu_offload.py [--model path/to/hart-0.7b-1024px-diffusers]

Without CUDA there is nothing to offload to: the pipeline runs on the CPU and the script reports CPU-side
figures (weights per component, peak resident memory, time) instead of the peak GPU memory.
Default model: the built-in one.
"""

import argparse
import resource
import sys
import time

import torch

from hart_pipeline import HARTPipeline
from hart_pipeline.default_model import load_default_pipeline

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", help="HART pipeline folder or Hub id (default: the built-in model)")
parser.add_argument("--prompt", default="a red circle above a blue square", help="the text prompt")
parser.add_argument("--out", default="offload.png", help="output image")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
pipe = load_default_pipeline(dtype) if args.model is None else HARTPipeline.from_pretrained(args.model, dtype=dtype)
for name in ("text_encoder", "transformer", "residual_head", "vae"):
    module = getattr(pipe, name)
    if module is not None:
        size = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
        print(f"{name:>13}: {size:8.1f} MiB of weights ({dtype})")
if cuda:
    pipe.enable_model_cpu_offload()  # order: text_encoder -> transformer -> residual_head -> vae
    print("model CPU offload: on (each component visits the GPU only while it runs)")
else:
    print("no CUDA device: running on the CPU without offload")

start = time.perf_counter()
image = pipe(args.prompt, generator=torch.Generator().manual_seed(0)).images[0]
elapsed = time.perf_counter() - start
image.save(args.out)
print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}) in {elapsed:.1f} s")
if cuda:
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    print(f"peak resident CPU memory of this process: {peak:.0f} MiB")
