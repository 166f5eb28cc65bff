"""Run the released 1024px model on a small GPU with diffusers' offloading (same image as without).

    python examples/cpu_offload.py --model path/to/hart-0.7b-1024px-diffusers [--mode model|sequential|group]

model: each component moves to the GPU while it runs (text_encoder -> transformer -> residual_head);
sequential: layer by layer (least memory, slowest); group: groups of blocks, prefetched on a CUDA stream.
The vae (hybrid tokenizer, 112M parameters) stays on the GPU: the AR loop uses it at every scale.
"""

import argparse

import torch

from hart_pipeline import HARTPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--prompt", default="a lemur in a magician hat")
parser.add_argument("--mode", choices=["model", "sequential", "group"], default="model")
args = parser.parse_args()

pipe = HARTPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
if args.mode == "model":
    pipe.enable_model_cpu_offload()
elif args.mode == "sequential":
    pipe.enable_sequential_cpu_offload()
else:
    pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=2, use_stream=True)
image = pipe(args.prompt, generator=torch.Generator().manual_seed(0)).images[0]
image.save("offload.png")
print("peak GPU memory: %.2f GiB" % (torch.cuda.max_memory_allocated() / 2**30))
