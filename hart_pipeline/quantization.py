"""Opt-in int8 inference: dynamic int8 Linear layers in the transformer and the residual head (torchao).

Both stages spend nearly all their time in fp32 GEMMs; int8 weights with int8 activations quantized per call run
those on the CPU's int8 units (VNNI / AMX), about 2.3x faster per layer on this project's CPU. It changes the
sampled tokens (it is not exact), so it is never the default. The diffusers way, with torchao installed::

    from hart_pipeline.quantization import int8_config
    pipe = HARTPipeline.from_pretrained(folder, dtype=torch.float32, quantization_config=int8_config())

(``hart generate --int8`` does the same; ``quantize_int8_(pipe.transformer)`` does it to a loaded model.) The
tokenizer (convolutions) and the text encoder stay as loaded.
"""

import warnings
from typing import Optional

INT8_COMPONENTS = ("transformer", "residual_head")


def cpu_int8_problem() -> Optional[str]:
    """Why int8 would not pay on this CPU, or None. torchao's int8 matmuls need the CPU's int8 dot-product units
    (VNNI or AMX); without them (e.g. an AVX2-only AMD EPYC) its layers run about 30x slower than float32
    (``benchmarks/README.md``)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported")]
    if None in probes or any(probe() for probe in probes):  # a torch without these probes: cannot tell, go on
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no int8 dot-product units (VNNI / AMX), so "
            "int8 layers run about 30x slower than float32 here; leave int8 out (or use a CUDA device)")


def _warn_if_slow_on_cpu() -> None:
    problem = cpu_int8_problem()
    if problem is not None:
        warnings.warn(f"int8 on the CPU: {problem}.", stacklevel=3)


def _int8_layer_config():
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    except ImportError as e:
        raise ImportError("int8 inference needs torchao: `pip install torchao` (CPU or CUDA build).") from e
    return Int8DynamicActivationInt8WeightConfig()


def quantize_int8_(module) -> None:
    """The same int8 layers in an already loaded module (e.g. ``pipe.transformer``), in place."""
    from torchao.quantization import quantize_

    if next(module.parameters()).device.type == "cpu":
        _warn_if_slow_on_cpu()
    quantize_(module, _int8_layer_config())


def int8_config(components=INT8_COMPONENTS):
    """A ``PipelineQuantizationConfig``: torchao's ``Int8DynamicActivationInt8WeightConfig`` for ``components``."""
    from diffusers import TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig

    import torch

    if not torch.cuda.is_available():  # the pipeline will run on this CPU
        _warn_if_slow_on_cpu()

    return PipelineQuantizationConfig(quant_mapping={name: TorchAoConfig(_int8_layer_config()) for name in components})


__all__ = ["INT8_COMPONENTS", "cpu_int8_problem", "int8_config", "quantize_int8_"]
