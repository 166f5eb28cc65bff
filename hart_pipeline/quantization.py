"""Opt-in int8 inference: int8 Linear layers in the transformer and the residual head.

Both stages spend nearly all their time in fp32 GEMMs. With int8 weights (per output channel) and int8
activations quantized per token at each call, those run on the CPU's int8 units: oneDNN's AMX / VNNI kernels on
the CPU (``Int8Linear``, ~8x faster per layer than fp32 on a CPU with AMX), torchao's dynamic int8 layers on CUDA.
It changes the sampled tokens (it is not exact), so it is never the default::

    pipe = HARTPipeline.from_pretrained(folder, dtype=torch.float32)
    quantize_int8_(pipe)  # the transformer and the residual head, in place; `hart generate --int8` does the same

The tokenizer (convolutions) and the text encoder stay as loaded. ``int8_config()`` is the diffusers
``quantization_config`` form (torchao's layers, also on the CPU, where they are ~3x slower than ``Int8Linear``).
"""

import warnings
from typing import Optional

import torch
from torch import nn

INT8_COMPONENTS = ("transformer", "residual_head")


def cpu_int8_problem() -> Optional[str]:
    """Why int8 would not pay on this CPU, or None. int8 matmuls need the CPU's int8 dot-product units (VNNI or
    AMX); without them (e.g. an AVX2-only AMD EPYC) int8 layers are no faster than float32: oneDNN's at about its
    speed, torchao's ~30x slower (``benchmarks/README.md``)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported")]
    if None in probes or any(probe() for probe in probes):  # a torch without these probes: cannot tell, go on
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no int8 dot-product units (VNNI / AMX), so "
            "int8 layers are no faster than float32 here; leave int8 out (or use a CUDA device)")


def _warn_if_slow_on_cpu() -> None:
    problem = cpu_int8_problem()
    if problem is not None:
        warnings.warn(f"int8 on the CPU: {problem}.", stacklevel=3)


class Int8Linear(nn.Module):
    """A CPU ``nn.Linear`` in int8 through oneDNN: weights symmetric per output channel, activations symmetric per
    token (quantized at each call, stored as uint8 around 128), int32 accumulation, fp32 out. Inference only: it
    has no state dict to save."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(f"Int8Linear runs on the CPU; this Linear is on {linear.weight.device} (on CUDA, "
                             "quantize_int8_ uses torchao's layers).")
        weight = linear.weight.detach().float()  # (out, in)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,)
        int8_weight = torch.round(weight / self.weight_scale[:, None]).to(torch.int8)
        self.packed_weight = torch.ops.onednn.qlinear_prepack(int8_weight, None)  # oneDNN's blocked layout
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        self._one, self._zero_point = torch.ones(()), torch.full((), 128, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"Int8Linear got a tensor on {x.device}: it runs on the CPU. Quantize after moving "
                               "the model (quantize_int8_ on CUDA uses torchao's layers).")
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)  # (N, 1), per token
        # uint8 with zero point 128 (the same symmetric grid): the u8 x s8 form that VNNI / AVX2 run natively
        # (int8 activations take oneDNN's reference path there, ~1000x slower; AMX runs both)
        q = torch.round(rows / scale).add_(128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise.tensor(  # (N, out) = (q - 128) @ int8_w.T * weight_scale, in fp32
            q, self._one, self._zero_point, self.packed_weight, self.weight_scale, self._zero_points, None, 1.0, 0,
            torch.float32, "none", [], "")
        y.mul_(scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError("int8 layers (quantize_int8_) are for inference only and have no weights to save: save "
                           "the float model (load it again without quantizing) and quantize after loading.")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear(child))
        else:
            _swap_linears(child)


def quantize_int8_(target) -> None:
    """int8 Linear layers in place: in a pipeline's transformer and residual head, or in one module. On the CPU
    ``Int8Linear`` (oneDNN), on CUDA torchao's ``Int8DynamicActivationInt8WeightConfig``."""
    modules = [getattr(target, name) for name in INT8_COMPONENTS] if not isinstance(target, nn.Module) else [target]
    on_cpu = [next(module.parameters(), torch.empty(0)).device.type == "cpu" for module in modules]
    if any(on_cpu):
        _warn_if_slow_on_cpu()
    for module, cpu in zip(modules, on_cpu):
        if cpu:
            _swap_linears(module)
        else:
            from torchao.quantization import quantize_

            quantize_(module, _torchao_layer_config())


def _torchao_layer_config():
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    except ImportError as e:
        raise ImportError("int8 inference on CUDA needs torchao: `pip install torchao`.") from e
    return Int8DynamicActivationInt8WeightConfig()


def int8_config(components=INT8_COMPONENTS):
    """A ``PipelineQuantizationConfig``: torchao's ``Int8DynamicActivationInt8WeightConfig`` for ``components``
    (the diffusers form, for CUDA; on the CPU ``quantize_int8_(pipe)`` after loading is ~3x faster)."""
    from diffusers import TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig

    if not torch.cuda.is_available():  # the pipeline will run on this CPU
        _warn_if_slow_on_cpu()

    return PipelineQuantizationConfig(quant_mapping={name: TorchAoConfig(_torchao_layer_config()) for name in components})


__all__ = ["INT8_COMPONENTS", "Int8Linear", "cpu_int8_problem", "int8_config", "quantize_int8_"]
