"""What the opt-in int8 path costs on the released architecture (random weights of its shapes; CPU).

    python benchmarks/int8_cost.py [--resolution 256] [--layers 24] [--threads 1] [--json PATH]

With fp32's sampled tokens given (teacher forcing), per scale: the relative error of the guided logits and the
share of greedy choices equal to fp32's; then the image of one seeded generation, int8 vs fp32 (PSNR), whose
tokens may diverge from the first flipped sample on. int8 = ``hart_pipeline.quantization.int8_config`` (torchao
dynamic int8 Linear layers in the transformer and the residual head).
"""

import argparse
import copy
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hart_pipeline import HARTResidualScheduler, add_residual, decode_tokens, generate_tokens  # noqa: E402
from hart_pipeline.sampling import guidance_ramp  # noqa: E402

from benchmark_generation import build_models, text_inputs  # noqa: E402


@torch.no_grad()
def guided_logits(transformer, vae, context, positions, indices, patch_nums):
    """Per scale, the guided logits with every earlier scale given (the official all-zero negative)."""
    inputs = vae.quantizer.teacher_forcing_input(indices, patch_nums).repeat(2, 1, 1)
    both = torch.cat([context, torch.zeros_like(context)])
    logits = transformer(both, torch.cat([positions, torch.zeros_like(positions)]), inputs, patch_nums).logits
    B, out, start = context.shape[0], [], 0
    for pn, t in zip(patch_nums, guidance_ramp(4.5, len(patch_nums))):
        scale = logits[:, start:start + pn * pn]
        out.append((1 + t) * scale[:B] - t * scale[B:])
        start += pn * pn
    return out


@torch.no_grad()
def image(transformer, head, vae, context, positions, patch_nums, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = generate_tokens(transformer, vae, context, positions, patch_nums=patch_nums, generator=g)
    return tokens, decode_tokens(vae, add_residual(tokens, head, HARTResidualScheduler(), generator=g))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--context-dim", type=int, default=1536)
    p.add_argument("--context-tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hart_pipeline.quantization import quantize_int8_

    vae, transformer, head, patch_nums = build_models(args)
    q_transformer, q_head = copy.deepcopy(transformer), copy.deepcopy(head)
    for module in (q_transformer, q_head):
        quantize_int8_(module)
    context, positions = text_inputs(args, 1, torch.device("cpu"))
    tokens, reference = image(transformer, head, vae, context, positions, patch_nums, args.seed)
    fp32 = guided_logits(transformer, vae, context, positions, tokens.indices, patch_nums)
    int8 = guided_logits(q_transformer, vae, context, positions, tokens.indices, patch_nums)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(int8, fp32)]
    agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(int8, fp32)]
    q_tokens, q_image = image(q_transformer, q_head, vae, context, positions, patch_nums, args.seed)
    sampled = [float((a == b).float().mean()) for a, b in zip(q_tokens.indices, tokens.indices)]
    mse = float(((q_image - reference) ** 2).mean())
    psnr = 10 * math.log10(1 / mse) if mse > 0 else float("inf")
    print(f"int8 vs fp32, {args.resolution}px schedule, {args.layers} layers, width {args.width} (random weights)")
    print("  teacher-forced guided-logit relative error per scale: " + " ".join(f"{r:.3f}" for r in rel))
    print("  teacher-forced greedy agreement per scale:            " + " ".join(f"{a:.2f}" for a in agree))
    print("  sampled tokens equal per scale (same seed):           " + " ".join(f"{a:.2f}" for a in sampled))
    print(f"  image PSNR int8 vs fp32 (same seed): {psnr:.1f} dB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"resolution": args.resolution, "layers": args.layers, "logit_relative_error": rel,
                       "greedy_agreement": agree, "sampled_agreement": sampled, "image_psnr_db": psnr}, f, indent=2)


if __name__ == "__main__":
    main()
