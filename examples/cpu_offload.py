"""Run a HART model on a small GPU with diffusers' offloading (same image as without).

    python examples/cpu_offload.py [--model path/to/hart-0.7b-1024px-diffusers] [--mode model|sequential|group]

model: each component moves to the GPU while it runs (text_encoder -> transformer -> residual_head);
sequential: layer by layer (least memory, slowest); group: groups of blocks, prefetched on a CUDA stream.
The vae (hybrid tokenizer) stays on the GPU: the AR loop uses it at every scale.
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
parser.add_argument("--mode", choices=["model", "sequential", "group"], default="model", help="offload mode (CUDA only)")
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
if not cuda:
    print("no CUDA device: running on the CPU without offload")
elif args.mode == "model":
    pipe.enable_model_cpu_offload()
elif args.mode == "sequential":
    pipe.enable_sequential_cpu_offload()
else:
    pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=2, use_stream=True)
if cuda:
    print(f"{args.mode} CPU offload: on")

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
