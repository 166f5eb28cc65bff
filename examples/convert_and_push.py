"""Convert the official checkpoint (llm/ + tokenizer/) to a diffusers folder, then publish it.

    python examples/convert_and_push.py --src hart-0.7b-1024px --text-encoder Qwen2-VL-1.5B-Instruct \
        --dst hart-0.7b-1024px-diffusers [--repo-id you/hart-0.7b-1024px-diffusers]

Same as the CLI: `hart convert SRC DST --text-encoder QWEN [--push-to-hub REPO_ID]`. Prints what was
converted, the files written and what a reload of the folder gives.
"""

import argparse
import os

from hart_pipeline import HARTPipeline
from hart_pipeline.convert import convert

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--src", required=True, help="official checkpoint folder (llm/ + tokenizer/)")
parser.add_argument("--dst", required=True, help="output diffusers folder")
parser.add_argument("--text-encoder", help="Qwen2 text model folder or Hub id to include (optional)")
parser.add_argument("--repo-id", help="Hub repo to push the converted pipeline to (optional)")
args = parser.parse_args()

convert(args.src, args.dst, text_encoder=args.text_encoder)  # safetensors, model_index.json, README.md model card
print(f"converted {args.src} -> {args.dst}")
for root, _, files in sorted(os.walk(args.dst)):
    for name in sorted(files):
        path = os.path.join(root, name)
        print(f"  {os.path.relpath(path, args.dst):<50} {os.path.getsize(path) / 2**20:9.2f} MiB")

pipe = HARTPipeline.from_pretrained(args.dst)  # strict: a folder that loads here is complete and finite
for name in ("transformer", "residual_head", "vae"):
    print(f"{name:>13}: {type(getattr(pipe, name)).__name__}, {getattr(pipe, name).num_parameters() / 1e6:.2f}M parameters")
print(f"text encoder: {type(pipe.text_encoder).__name__ if pipe.text_encoder is not None else 'not included '}"
      f"{'' if pipe.text_encoder is not None else '(pass text_encoder= and tokenizer= to from_pretrained)'}")
print(f"sizes: {sorted(pipe.supported_sizes)} (native {pipe.default_size})")
if args.repo_id:
    pipe.push_to_hub(args.repo_id)  # or pipe.save_pretrained(args.dst, push_to_hub=True, repo_id=args.repo_id)
    print("pushed to", args.repo_id)
else:
    print("not pushed (no --repo-id)")
