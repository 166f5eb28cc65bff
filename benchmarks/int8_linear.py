"""Does int8 pay on this CPU? One Linear of the released transformer's width (1536 -> 4096, 700 tokens: a 512px
scale's worth), float32 vs ``quantize_int8_``'s layer (what ``--int8`` uses: oneDNN ``Int8Linear`` on the CPU),
one thread, interleaved repeats.

    python benchmarks/int8_linear.py            # prints ms per call and the int8 / fp32 ratio per repeat

With AMX int8 is ~8-10x faster per layer, with VNNI only ~3x; without them (AVX2 only) it is no faster, and ``hart
generate --int8`` refuses such a CPU (``hart_pipeline.quantization.cpu_int8_problem``).
"""

import argparse
import copy
import time
import warnings

import torch

from hart_pipeline.quantization import cpu_int8_problem, quantize_int8_


def ms_per_call(layer: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        layer(x)
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; int8 problem: {cpu_int8_problem()}")
    fp32 = torch.nn.Linear(1536, 4096, bias=False).eval()
    int8 = copy.deepcopy(fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-CPU warning: this script measures it
        quantize_int8_(int8)
    x = torch.randn(1, args.tokens, 1536)
    with torch.no_grad():
        fp32(x), int8(x)  # warm-up
        for rep in range(args.repeats):
            a, b = ms_per_call(fp32, x, args.calls), ms_per_call(int8, x, args.calls)
            print(f"repeat {rep}: fp32 {a:.1f} ms, int8 {b:.1f} ms, int8 / fp32 {b / a:.2f}")


if __name__ == "__main__":
    main()
