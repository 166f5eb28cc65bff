"""Latency, throughput and peak memory of HART generation, per stage, ours vs the official code.

Random weights with the released architecture (override depth/width to fit a CPU run). Each
implementation runs in its own subprocess so its peak memory is its own. Examples:

    # ours only, released 1024px architecture on a GPU, batch 1 and 8
    python benchmarks/benchmark_generation.py --resolution 1024 --batch 1 8 --device cuda --dtype bf16
    # ours vs the official code (a checkout fetched to a scratch folder), same weights, CPU, 512px schedule
    python benchmarks/benchmark_generation.py --resolution 512 --official /path/to/hart --device cpu

Stages: text (text encoder), ar (all scales), residual (residual diffusion), decode (tokenizer decoder).
Peak memory: CUDA max_memory_allocated per stage, or the process's peak RSS on CPU.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hart_pipeline import (  # noqa: E402
    HARTHybridTokenizer,
    HARTResidualHead,
    HARTResidualScheduler,
    HARTTransformer,
    add_residual,
    decode_tokens,
    generate_tokens,
)
from hart_pipeline.schedules import PATCH_NUMS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# glibc reads these at process start: blocks up to 1 GiB from the heap, the heap top never trimmed
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 31 - 1)}


def build_models(args):
    """Random models with the released configuration (or the overrides), deterministic from the seed."""
    torch.manual_seed(args.seed)
    patch_nums = PATCH_NUMS[args.resolution]
    vae = HARTHybridTokenizer(patch_nums=patch_nums)
    transformer = HARTTransformer(num_layers=args.layers, embed_dim=args.width, num_heads=args.width // 64,
                                  context_dim=args.context_dim, patch_nums=patch_nums)
    head = HARTResidualHead(condition_dim=args.width)
    with torch.no_grad():  # break the constant inits so every weight matters
        for module in (vae, transformer, head):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return vae.eval(), transformer.eval(), head.eval(), patch_nums


class Meter:
    def __init__(self, device: torch.device):
        self.device = device
        self.results: Dict[str, Dict[str, float]] = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, name: str, fn):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        self.sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.results[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak}
        return out

    def split(self, name: str, parts: Dict[str, Dict[str, float]]) -> None:
        """Replace the result ``name`` by ``parts`` (timed inside it) and the rest of it under ``name``."""
        whole = self.results.pop(name)
        rest = {k: whole[k] - sum(p[k] for p in parts.values()) for k in ("seconds", "cpu_seconds")}
        self.results[name] = {**rest, "peak_mib": whole["peak_mib"]}
        self.results.update({k: {**v, "peak_mib": whole["peak_mib"]} for k, v in parts.items()})


def text_inputs(args, batch: int, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    context = torch.randn(batch, args.context_tokens, args.context_dim, generator=g).to(device)
    positions = torch.arange(args.context_tokens)[None].repeat(batch, 1).to(device)
    return context, positions


def text_encoder(args, device, dtype):
    """A random Qwen2 body of the official text model's shape (hidden 1536, 28 layers) or smaller."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(hidden_size=args.context_dim, intermediate_size=8960 * args.context_dim // 1536,
                         num_hidden_layers=args.text_layers, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=2048)
    return Qwen2Model(config).to(device, dtype).eval()


def measure(args, device, dtype, generate) -> Dict:
    """Per batch size: ``warmup`` unmeasured runs, then one measured run of text encoding + ``generate``."""
    encoder = text_encoder(args, device, dtype) if args.text_layers else None
    report = {}
    for batch in args.batch:
        context, positions = text_inputs(args, batch, device)
        ids = torch.randint(0, 1000, (batch, args.context_tokens + 170), device=device)
        for _ in range(args.warmup + 1):
            meter = Meter(device)
            with torch.no_grad():
                if encoder is not None:
                    meter.run("text", lambda: encoder(input_ids=ids).last_hidden_state)
                generate(meter, context.to(dtype), positions)
        report[batch] = meter.results
    return report


def run_ours(args) -> Dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    vae, transformer, head, patch_nums = build_models(args)
    vae, transformer, head = vae.to(device, dtype), transformer.to(device, dtype), head.to(device, dtype)
    if args.int8:  # hart_pipeline.quantization's int8 path, applied to the in-memory models
        from hart_pipeline.quantization import quantize_int8_

        quantize_int8_(transformer)
        quantize_int8_(head)
    if args.compile:
        transformer.compile_repeated_blocks(dynamic=True)
    if args.attention:
        transformer.set_attention_backend(args.attention)
    scheduler = HARTResidualScheduler()

    def generate(meter: Meter, context, positions):
        g = torch.Generator(device=device).manual_seed(args.seed)
        tokens = meter.run("ar", lambda: generate_tokens(transformer, vae, context, positions, patch_nums=patch_nums, generator=g,
                                                         guidance_stop_scale=args.guidance_stop_scale,
                                                         token_pruning=dict(args.token_pruning or []) or None))
        tokens = meter.run("residual", lambda: add_residual(tokens, head, scheduler, generator=g))
        meter.run("decode", lambda: decode_tokens(vae, tokens))

    return measure(args, device, dtype, generate)


def run_official(args) -> Dict:
    from official_shim import build_official  # noqa: E402  (CPU shim for the official code; see that file)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    vae, transformer, head, _ = build_models(args)
    model = build_official(args.official, vae, transformer, head, device, dtype)

    # the official entry point runs AR + residual + decode in one call: its residual sampler and its decoder are
    # timed from inside (wrapped, not changed), the AR loop is the rest
    parts: Dict[str, Dict[str, float]] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            meter = Meter(device)
            out = meter.run(name, lambda: fn(*a, **k))
            part = parts.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0})
            part["seconds"] += meter.results[name]["seconds"]
            part["cpu_seconds"] += meter.results[name]["cpu_seconds"]
            return out
        return wrapper

    model.diffloss.sample = timed("residual", model.diffloss.sample)
    model.vae_proxy[0].fhat_to_img = timed("decode", model.vae_proxy[0].fhat_to_img)

    def generate(meter: Meter, context, positions):
        parts.clear()
        meter.run("ar", lambda: model.autoregressive_infer_cfg(
            B=context.shape[0], label_B=context, cfg=4.5, g_seed=args.seed, more_smooth=True,
            context_position_ids=positions, context_mask=torch.ones_like(positions, dtype=torch.bool)))
        meter.split("ar", dict(parts))

    return measure(args, device, dtype, generate)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024, choices=sorted(PATCH_NUMS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=24, help="transformer depth (released: 24)")
    parser.add_argument("--width", type=int, default=1536, help="transformer width (released: 1536)")
    parser.add_argument("--context-dim", type=int, default=1536)
    parser.add_argument("--context-tokens", type=int, default=300)
    parser.add_argument("--text-layers", type=int, default=0, help="random Qwen2 text encoder depth (official: 28; 0 = skip)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (regional)")
    parser.add_argument("--attention", help="a diffusers attention backend: native (default), flash, _flash_3_hub, sage, "
                                            "xformers, _native_math, ...")
    parser.add_argument("--official", help="path to a checkout of github.com/mit-han-lab/hart to compare with")
    parser.add_argument("--guidance-stop-scale", type=int, help="fast mode (ours): no guidance from this scale on")
    parser.add_argument("--token-pruning", type=lambda v: tuple(float(x) if "." in x else int(x) for x in v.split(":")),
                        nargs="+", help="fast mode (ours): SIDE:FRACTION pairs, e.g. 48:0.5 64:0.75")
    parser.add_argument("--int8", action="store_true", help="ours with dynamic int8 Linear layers (transformer + head)")
    parser.add_argument("--keep-freed-memory", choices=["ours", "both"],
                        help="glibc malloc keeps freed blocks for reuse instead of unmapping them (%s) in our process "
                             "only, or in both (default: neither)" % " ".join(f"{k}={v}" for k, v in KEEP_FREED.items()))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved measured runs of each implementation")
    parser.add_argument("--json", help="also write the figures to this JSON file (e.g. benchmarks/results/...)")
    parser.add_argument("--impl", choices=["ours", "official"], help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.impl:
        print(json.dumps(run_ours(args) if args.impl == "ours" else run_official(args)))
        return

    def child(impl: str) -> Dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl] + (argv if argv is not None else sys.argv[1:])
        env = {**os.environ, **(KEEP_FREED if args.keep_freed_memory in ("both", impl) else {})}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # interleaved: ours, official, ours, official ... (one measured run each), so both see the same machine load
    runs = {"ours": [], "official": []}
    for _ in range(args.repeats):
        runs["ours"].append(child("ours"))
        if args.official:
            runs["official"].append(child("official"))
    key = "cpu_seconds" if args.device == "cpu" else "seconds"
    print(f"HART generation, {args.resolution}px schedule, layers={args.layers}, width={args.width}, "
          f"{args.device} {args.dtype}, torch {torch.__version__}, {args.repeats} interleaved run(s), "
          f"{'CPU time' if key == 'cpu_seconds' else 'wall time'} (best of the runs), freed memory kept: "
          f"{args.keep_freed_memory or 'neither'}")
    report = {"resolution": args.resolution, "layers": args.layers, "width": args.width, "device": args.device,
              "dtype": args.dtype, "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
              "timing": key, "repeats": args.repeats, "keep_freed_memory": args.keep_freed_memory or "neither",
              "batches": {}}
    for batch in args.batch:
        rows = {}
        for impl in ("ours", "official"):
            if not runs[impl]:
                continue
            stages = {s: min(r[str(batch)][s][key] for r in runs[impl]) for s in ("ar", "residual", "decode")}
            stages["total"] = min(sum(r[str(batch)][s][key] for s in ("ar", "residual", "decode")) for r in runs[impl])
            stages["peak_mib"] = min(max(v["peak_mib"] for v in r[str(batch)].values()) for r in runs[impl])
            rows[impl] = stages
            parts = ", ".join(f"{s} {stages[s]:.2f}s" for s in ("ar", "residual", "decode"))
            print(f"  {impl:8s} batch {batch}: total {stages['total']:.2f}s ({parts}), peak {stages['peak_mib']:.0f} MiB")
        if "official" in rows:
            speedups = {s: rows["official"][s] / rows["ours"][s] for s in ("total", "ar", "residual", "decode")}
            rows["speedup"] = speedups
            rows["memory_ratio"] = rows["ours"]["peak_mib"] / rows["official"]["peak_mib"]
            print(f"  -> speed-up total x{speedups['total']:.2f} (ar x{speedups['ar']:.2f}, residual "
                  f"x{speedups['residual']:.2f}, decode x{speedups['decode']:.2f}), memory ratio {rows['memory_ratio']:.2f}")
        report["batches"][str(batch)] = rows
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"  wrote {args.json}")


if __name__ == "__main__":
    main()
