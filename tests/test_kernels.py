"""Fused kernels against the PyTorch reference, and attention backends against each other.

The Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set in a subprocess so the
rest of the suite keeps the compiled path untouched).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hart_pipeline import kernels
from hart_pipeline.kernels import attention, reference

from conftest import text_condition, tiny_transformer, tiny_vae

TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from hart_pipeline.kernels import reference, triton_kernels as tk

    g = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.float16):  # the CPU interpreter has no bfloat16 (numpy); GPU runs cover it
        x = torch.randn(3, 5, 64, generator=g).to(dtype)
        r = torch.randn(3, 5, 64, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
        worst[f"rms_{dtype}"] = (tk.rms_norm(x, w, 1e-6).float() - reference.rms_norm(x, w, 1e-6).float()).abs().max().item()
        y, s = tk.add_rms_norm(x, r, w, 1e-6)
        y_ref, s_ref = reference.add_rms_norm(x, r, w, 1e-6)
        worst[f"add_rms_{dtype}"] = max((y.float() - y_ref.float()).abs().max().item(), (s.float() - s_ref.float()).abs().max().item())
        q = torch.randn(2, 7, 3, 4, 16, generator=g).to(dtype).permute(2, 0, 3, 1, 4)[0]  # strided like q from qkv
        cos, sin = torch.randn(2, 7, 16, generator=g).to(dtype), torch.randn(2, 7, 16, generator=g).to(dtype)
        worst[f"rope_{dtype}"] = (tk.rope(q, cos, sin).float() - reference.rope(q, cos, sin).float()).abs().max().item()
    print(worst)
    assert all(v <= 1e-6 for k, v in worst.items() if "float32" in k), worst
    assert all(v <= 1e-2 for v in worst.values()), worst
    """
)


def test_triton_kernels_match_reference_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_dispatch_uses_reference_on_cpu():
    x = torch.randn(4, 32)
    w = torch.randn(32)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    kernels.set_fused_kernels(False)
    try:
        assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    finally:
        kernels.set_fused_kernels(True)


def test_block_attention_equals_dense_block_causal_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g) for _ in range(3))
    ends = [5, 6, 9, 12]
    levels = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 1, 3, 3]))
    mask = levels[:, None] >= levels[None, :]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)
    for backend in (None, "native", "_native_math"):
        assert torch.allclose(attention(q, k, v, 0.1, backend, ends), dense, atol=1e-6)


@pytest.mark.parametrize("backend", ["_native_math", "xformers"])
def test_attention_backends_give_the_same_logits(backend):
    if backend == "xformers":
        pytest.importorskip("xformers.ops", reason="xformers is optional (not installable on CPU-only machines)")
    transformer, vae = tiny_transformer(), tiny_vae()
    context, positions = text_condition()
    tokens = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    inputs = vae.quantizer.teacher_forcing_input(tokens.indices, (1, 2, 3, 4))
    with torch.no_grad():
        reference_logits = transformer(context, positions, inputs).logits
        transformer.set_attention_backend(backend)
        logits = transformer(context, positions, inputs).logits
    assert ((logits - reference_logits).abs().max() / reference_logits.abs().max()) <= 1e-5


@pytest.fixture(autouse=True)
def restore_active_attention_backend():
    """diffusers' set_attention_backend also sets a process-wide active backend: undo it after each test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="must be one of"):
        tiny_transformer().set_attention_backend("flash3")


def test_diffusers_backend_api_reaches_every_block():
    """set/reset_attention_backend and the attention_backend() context act on HART's processor; the
    default ("native") is the SDPA call the model made before the dispatcher, bit for bit."""
    from diffusers.models.attention_dispatch import attention_backend
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import hart_pipeline.models.transformer as module

    transformer, vae = tiny_transformer(), tiny_vae()
    context, positions = text_condition()
    inputs = vae.quantizer.teacher_forcing_input(vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).indices, (1, 2, 3, 4))
    with torch.no_grad():
        default = transformer(context, positions, inputs).logits
    processors = [block.attn.processor for block in transformer.blocks]
    assert all(type(p) is module.HARTAttnProcessor for p in processors)
    transformer.set_attention_backend("_native_math")
    assert all(p._attention_backend == "_native_math" for p in processors)
    transformer.reset_attention_backend()
    assert all(p._attention_backend is None for p in processors)

    calls = []
    with attention_backend("_native_math"):
        from diffusers.models import attention_dispatch

        original = attention_dispatch._AttentionBackendRegistry._backends["_native_math"]
        attention_dispatch._AttentionBackendRegistry._backends["_native_math"] = lambda **kw: calls.append(1) or original(**kw)
        try:
            with torch.no_grad():
                math = transformer(context, positions, inputs).logits
        finally:
            attention_dispatch._AttentionBackendRegistry._backends["_native_math"] = original
    assert len(calls) == 2 * 4  # 2 blocks x 4 scale blocks (block-causal: one call per scale)
    assert ((math - default).abs().max() / default.abs().max()) <= 1e-5

    # the reference: plain SDPA per scale block over the key prefix, as before the dispatcher
    def reference(q, k, v, scale, backend=None, block_ends=None):
        outs, start = [], 0
        for end in block_ends:
            outs.append(sdpa(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=scale))
            start = end
        return torch.cat(outs, dim=2)

    original_attention = module.kernels.attention
    module.kernels.attention = reference
    try:
        with torch.no_grad():
            plain = transformer(context, positions, inputs).logits
    finally:
        module.kernels.attention = original_attention
    assert torch.equal(plain, default)
