"""Convert the official checkpoint (llm/ + tokenizer/) to a diffusers folder, then publish it.

    python examples/convert_and_push.py --src hart-0.7b-1024px --text-encoder Qwen2-VL-1.5B-Instruct \
        --dst hart-0.7b-1024px-diffusers [--repo-id you/hart-0.7b-1024px-diffusers]

Same as the CLI: `hart convert SRC DST --text-encoder QWEN [--push-to-hub REPO_ID]`.
"""

import argparse

from hart_pipeline import HARTPipeline
from hart_pipeline.convert import convert

parser = argparse.ArgumentParser()
parser.add_argument("--src", required=True)
parser.add_argument("--dst", required=True)
parser.add_argument("--text-encoder")
parser.add_argument("--repo-id")
args = parser.parse_args()

convert(args.src, args.dst, text_encoder=args.text_encoder)  # safetensors, model_index.json, README.md model card
pipe = HARTPipeline.from_pretrained(args.dst)
if args.repo_id:
    pipe.push_to_hub(args.repo_id)  # or pipe.save_pretrained(args.dst, push_to_hub=True, repo_id=args.repo_id)
    print("pushed to", args.repo_id)
