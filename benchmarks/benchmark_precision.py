"""Low precision and quantization against fp32, on the built-in model (CPU, offline).

    python benchmarks/benchmark_precision.py [--prompts 8] [--steps 8] [--dtypes bf16 fp16] [--quantize int8wo]

For every dtype (``HARTPipeline.from_pretrained(..., dtype=...)``): per scale, the share of tokens equal
to fp32's when every scale is sampled (same seed; one differing token changes everything after it) and
the share of greedy (argmax of the guided logits) choices equal to fp32's when all scales are
teacher-forced with fp32's tokens (the precision's own error at each scale), then the image error (mean / max absolute difference in [0, 1], PSNR). For the quantization
(``PipelineQuantizationConfig`` with torchao, text encoder + transformer): the components' memory
footprint before and after, and the same agreement and image figures.
"""

import argparse
import math
import tempfile
from typing import Dict, List

import numpy as np
import torch

from hart_pipeline import HARTPipeline, decode_tokens
from hart_pipeline.default_model import load_default_pipeline
from hart_pipeline.sampling import guidance_ramp

PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow square left of a purple circle",
           "three blue circles", "a small red triangle below a large green square", "an orange circle",
           "a purple square right of a yellow triangle", "two red squares and a blue circle"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def generate(pipe: HARTPipeline, prompt: str, seed: int, steps: int):
    """Tokens as the pipeline draws them (default settings) and the image in [0, 1]."""
    out = pipe(prompt, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed))
    return out.images, decode_tokens(pipe.vae, out.images).float()


@torch.no_grad()
def greedy_teacher_forced(pipe: HARTPipeline, prompt: str, indices: List[torch.Tensor], guidance_scale: float = 4.5):
    """Per scale, the argmax of the guided logits with every earlier scale given as ``indices``."""
    patch_nums = tuple(pipe.transformer.config.patch_nums)
    embeds, positions, _, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"))
    context = torch.cat([embeds, torch.zeros_like(embeds)])
    position_ids = torch.cat([positions, torch.zeros_like(positions)])
    inputs = pipe.vae.quantizer.teacher_forcing_input(indices, patch_nums).repeat(2, 1, 1)
    logits = pipe.transformer(context, position_ids, inputs, patch_nums).logits
    choices, start = [], 0
    for si, (pn, t) in enumerate(zip(patch_nums, guidance_ramp(guidance_scale, len(patch_nums)))):
        scale = logits[:, start:start + pn * pn]
        choices.append(((1 + t) * scale[:1] - t * scale[1:]).argmax(-1))
        start += pn * pn
    return choices


def compare(pipe: HARTPipeline, reference: List, steps: int) -> Dict[str, List[float]]:
    """Per-scale free-running and teacher-forced greedy agreement with fp32, and the image errors."""
    num_scales = len(reference[0][0].indices)
    free, forced, mae, peak, psnr = np.zeros(num_scales), np.zeros(num_scales), [], [], []
    for (ref_tokens, ref_image, ref_greedy), (prompt, seed) in zip(reference, CASES):
        tokens, image = generate(pipe, prompt, seed, steps)
        free += [(a == b).float().mean().item() for a, b in zip(tokens.indices, ref_tokens.indices)]
        greedy = greedy_teacher_forced(pipe, prompt, ref_tokens.indices)
        forced += [(a == b).float().mean().item() for a, b in zip(greedy, ref_greedy)]
        error = (image - ref_image).abs()
        mae.append(error.mean().item())
        peak.append(error.max().item())
        mse = (error ** 2).mean().item()
        psnr.append(float("inf") if mse == 0 else 10 * math.log10(1 / mse))
    n = len(reference)
    return {"free": list(free / n), "forced": list(forced / n), "mae": [float(np.mean(mae))],
            "max": [float(np.max(peak))], "psnr": [float(np.mean(psnr))]}


def report(name: str, figures: Dict[str, List[float]]) -> None:
    print(f"{name}: image mean |diff| {figures['mae'][0]:.4f}, max {figures['max'][0]:.3f}, PSNR {figures['psnr'][0]:.1f} dB")
    print("  tokens equal to fp32, per scale, free-running:  " + " ".join(f"{a:.2f}" for a in figures["free"]))
    print("  greedy choices equal to fp32's, teacher-forced: " + " ".join(f"{a:.2f}" for a in figures["forced"]))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) counts its inner tensors."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def footprint(pipe: HARTPipeline, names) -> Dict[str, float]:
    """MiB of each component's parameters and buffers, as stored."""
    return {name: sum(stored_bytes(t) for t in getattr(pipe, name).state_dict().values()) / 2**20 for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--quantize", nargs="*", default=["int8wo"], choices=["int8wo"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    global CASES
    CASES = [(p, s) for p in PROMPTS[: args.prompts] for s in range(args.seeds)]
    fp32 = load_default_pipeline()
    fp32.set_progress_bar_config(disable=True)
    reference = []
    for prompt, seed in CASES:
        tokens, image = generate(fp32, prompt, seed, args.steps)
        reference.append((tokens, image, greedy_teacher_forced(fp32, prompt, tokens.indices)))
    print(f"built-in model, {len(CASES)} generations ({args.prompts} prompts x {args.seeds} seeds), "
          f"{len(reference[0][0].indices)} scales, {args.steps} residual steps, CPU")
    for name in args.dtypes:
        pipe = load_default_pipeline(dtype=DTYPES[name])
        pipe.set_progress_bar_config(disable=True)
        report(name, compare(pipe, reference, args.steps))

    if args.quantize:
        from diffusers import TorchAoConfig
        from diffusers.quantizers import PipelineQuantizationConfig
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig as TransformersTorchAoConfig

        components = ("text_encoder", "transformer")
        with tempfile.TemporaryDirectory() as folder:
            fp32.save_pretrained(folder)  # a complete folder (with the text encoder) to load quantized
            config = PipelineQuantizationConfig(quant_mapping={
                "transformer": TorchAoConfig(Int8WeightOnlyConfig()),
                "text_encoder": TransformersTorchAoConfig(Int8WeightOnlyConfig()),
            })
            quantized = HARTPipeline.from_pretrained(folder, quantization_config=config)
            quantized.set_progress_bar_config(disable=True)
        before, after = footprint(fp32, components), footprint(quantized, components)
        for name in components:
            print(f"int8 weight-only (torchao) {name}: {before[name]:.2f} MiB -> {after[name]:.2f} MiB "
                  f"({100 * (1 - after[name] / before[name]):.0f}% saved)")
        total_before, total_after = sum(before.values()), sum(after.values())
        print(f"  text encoder + transformer: {total_before:.2f} -> {total_after:.2f} MiB, "
              f"{total_before - total_after:.2f} MiB saved")
        report("int8wo", compare(quantized, reference, args.steps))


CASES: List = []

if __name__ == "__main__":
    main()
