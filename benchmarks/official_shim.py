"""Build the official HART model (from a checkout given by path) with *our* weights, for benchmarks.

On machines without the official CUDA extension the one kernel it calls (RMSNorm) is replaced by the
same computation in PyTorch, and ``.cuda()`` becomes a no-op; nothing else of the official code changes.
No official code is part of this repository: the path points at a separate checkout.
"""

import sys
import types

import torch
import torch.nn as nn


def _install_cpu_shim() -> None:
    try:
        import hart_backend.fused_kernels  # noqa: F401  (the real extension: nothing to do)
        return
    except ImportError:
        pass

    def rms_norm(out, x, weight, eps, use_quant=False):
        x32 = x.float()
        out.copy_((x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight)

    fused = types.ModuleType("hart_backend.fused_kernels")
    fused.rms_norm = rms_norm
    backend = types.ModuleType("hart_backend")
    backend.fused_kernels = fused
    sys.modules["hart_backend"], sys.modules["hart_backend.fused_kernels"] = backend, fused
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        nn.Module.cuda = lambda self, *a, **k: self


def _official_tokenizer_state(vae) -> dict:
    state = {}
    for key, value in vae.state_dict().items():
        key = key.replace("quantizer.phis.", "quantize.quant_resi.qresi_ls.").replace("quantizer.embedding.", "quantize.embedding.")
        state["vae." + key] = value
    return state


def build_official(path: str, vae, transformer, head, device: torch.device, dtype: torch.dtype):
    """The official ``HARTForT2I`` holding the weights of our (vae, transformer, head)."""
    _install_cpu_shim()
    sys.path.insert(0, path)
    from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc, HARTAutoEncoderWithDiscConfig
    from hart.modules.models.transformer import HARTForT2I, HARTForT2IConfig

    vc, tc, hc = vae.config, transformer.config, head.config
    tokenizer = HARTAutoEncoderWithDisc(HARTAutoEncoderWithDiscConfig(
        vocab_size=vc.vocab_size, z_channels=vc.latent_channels, ch=vc.base_channels, ch_mult=tuple(vc.channel_multipliers),
        quant_resi=vc.quant_resi, share_quant_resi=vc.num_phi, v_patch_nums=tuple(tc.patch_nums),
        quantizer_type="var_hybrid", hybrid=True))
    missing, unexpected = nn.Module.load_state_dict(tokenizer, _official_tokenizer_state(vae), strict=False)
    assert not unexpected and all(k.startswith("disc.") or k.endswith("ema_vocab_hit_SV") for k in missing), missing
    HARTAutoEncoderWithDisc.from_pretrained = classmethod(lambda cls, *a, **k: tokenizer)

    model = HARTForT2I(HARTForT2IConfig(
        vae_path="(in memory)", context_token=tc.context_tokens, context_dim=tc.context_dim, embed_dim=tc.embed_dim,
        depth=tc.num_layers, num_heads=tc.num_heads, mlp_ratio=tc.mlp_ratio, norm_eps=tc.norm_eps,
        patch_nums=tuple(tc.patch_nums), attn_type="llama", mlp_type="llama", disable_aln=True, shared_aln=False,
        use_timestep_embed=True, use_context_norm=True, use_cross_attn=False, attn_l2_norm=tc.attn_l2_norm,
        diff_width=hc.width, diff_depth=hc.num_layers, num_sampling_steps="8", sampler="iddpm"))
    state = dict(transformer.state_dict())
    state.update({"diffloss.net." + k: v for k, v in head.state_dict().items()})
    missing, unexpected = nn.Module.load_state_dict(model, state, strict=False)
    assert not unexpected and all(k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("zero_k_bias") for k in missing)
    model.vae_proxy[0].to(device, dtype)
    return model.to(device, dtype).eval()
