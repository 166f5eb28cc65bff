"""Parity with the official implementation (numbers recorded from it; see tests/fixtures/README.md).

Each fixture config is converted from its official on-disk layout with our converter, saved and
reloaded with ``from_pretrained``, then compared with what the official code computed.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hart_pipeline import (
    HARTHybridTokenizer,
    HARTResidualHead,
    HARTResidualScheduler,
    HARTTransformer,
    add_residual,
    decode_tokens,
    generate_tokens,
    sample_residual,
)
from hart_pipeline.convert import convert
from hart_pipeline.sampling import guidance_ramp, guided_head_output

from conftest import FIXTURES, teacher_forced_hidden_states

CONFIGS = ["tiny4", "tiny8"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _load_case(name: str, tmp_path_factory) -> dict:
    root = os.path.join(FIXTURES, "parity", name)
    dst = str(tmp_path_factory.mktemp(name))
    convert(os.path.join(root, "official"), dst)
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    return {
        "meta": meta,
        "expected": load_file(os.path.join(root, "expected.safetensors")),
        "patch_nums": tuple(meta["patch_nums"]),
        "transformer": HARTTransformer.from_pretrained(os.path.join(dst, "transformer")).eval(),
        "head": HARTResidualHead.from_pretrained(os.path.join(dst, "residual_head")).eval(),
        "vae": HARTHybridTokenizer.from_pretrained(os.path.join(dst, "vae")).eval(),
        "scheduler": HARTResidualScheduler.from_pretrained(os.path.join(dst, "scheduler")),
    }


@pytest.fixture(scope="module", params=CONFIGS)
def case(request, tmp_path_factory):
    return _load_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """The official training forward and the schedule tables were recorded with tiny4 only."""
    return _load_case("tiny4", tmp_path_factory)


def test_tokenizer_encode(case):
    e, vae = case["expected"], case["vae"]
    with torch.no_grad():
        latent = vae.encode_latent(e["tok.images"])
        tokens = vae.encode(e["tok.images"], patch_nums=case["patch_nums"])
    assert abs_err(latent, e["tok.latent"]) <= 1e-4
    for si, idx in enumerate(tokens.indices):
        assert torch.equal(idx, e[f"tok.idx.{si}"]), f"scale {si} indices differ"
    assert abs_err(tokens.residual, e["tok.residual"]) <= 1e-4
    fhat = vae.quantizer.indices_to_latent(tokens.indices, case["patch_nums"])
    assert abs_err(fhat, e["tok.fhat_discrete"]) <= 1e-4


def test_tokenizer_decode(case):
    e, vae = case["expected"], case["vae"]
    indices = [e[f"tok.idx.{si}"] for si in range(len(case["patch_nums"]))]
    with torch.no_grad():
        discrete = vae.decode(indices).sample
        hybrid = vae.decode(indices, residual=e["tok.residual"]).sample
    assert abs_err(discrete, e["tok.image_discrete"]) <= 1e-4
    assert abs_err(hybrid, e["tok.image_hybrid"]) <= 1e-4


def _teacher_forced(case):
    """Our KV-cached loop fed the official ground-truth indices; returns tokens and per-scale hidden states."""
    e = case["expected"]
    indices = [e[f"tok.idx.{si}"] for si in range(len(case["patch_nums"]))]
    return teacher_forced_hidden_states(case["transformer"], case["vae"], e["ctx"], e["ctx_pos"], indices, case["patch_nums"])


def test_kv_cached_logits_match_official(case):
    e, transformer = case["expected"], case["transformer"]
    tokens, hidden = _teacher_forced(case)
    B = e["ctx"].shape[0]
    ramp = guidance_ramp(4.5, len(case["patch_nums"]))
    # the recorder wrote the ramp as cfg * si / (SN - 1); the official loop computes cfg * (si / (SN - 1))
    assert torch.allclose(torch.tensor(ramp, dtype=torch.float64), e["ar.cfg_ramp"], rtol=0, atol=1e-12)
    with torch.no_grad():
        condition = transformer.embed_context(torch.cat([e["ctx"], torch.zeros_like(e["ctx"])]))
        modulation = transformer.head_modulation(condition)
        for si, h in enumerate(hidden):
            logits = transformer.logits(h, modulation)
            assert rel_err(logits, e[f"ar.logits.{si}"]) <= 1e-4, f"scale {si}"
            if si == 0:
                logits = logits[:, -1:]
            guided = (1 + ramp[si]) * logits[:B] - ramp[si] * logits[B:]
            assert rel_err(guided, e[f"ar.cfg_logits.{si}"]) <= 1e-4, f"scale {si}"
            assert torch.equal(guided.argmax(-1), e[f"ar.greedy.{si}"]), f"greedy choice differs at scale {si}"
    assert tokens.residual_guidance == e["ar.final_cfg"].item()  # the value the official loop passed
    assert abs_err(tokens.residual_condition.flatten(0, 1), e["ar.diff_cond"]) <= 1e-4
    image = decode_tokens(case["vae"], tokens, discrete_only=True)
    assert abs_err(image, e["ar.image_teacher_forced"]) <= 1e-4


def test_teacher_forced_forward_matches_official(tiny4):
    case = tiny4
    e, transformer, vae = case["expected"], case["transformer"], case["vae"]
    indices = [e[f"tok.idx.{si}"] for si in range(len(case["patch_nums"]))]
    scale_inputs = vae.quantizer.teacher_forcing_input(indices, case["patch_nums"])
    assert abs_err(scale_inputs, e["tf.input"]) <= 1e-4
    with torch.no_grad():
        out = transformer(e["ctx"], e["ctx_pos"], scale_inputs, patch_nums=case["patch_nums"])
    assert rel_err(out.logits, e["tf.logits"]) <= 1e-4


def test_residual_head_matches_official(case):
    e, head = case["expected"], case["head"]
    with torch.no_grad():
        assert abs_err(head(e["diff.x"], e["diff.t"], e["diff.c"]), e["diff.out"]) <= 1e-5
        # official forward_with_cfg(x, t, c, 2.5): the first half of x for both halves of c
        N = e["diff.x"].shape[0] // 2
        guided = guided_head_output(head, e["diff.x"][:N], e["diff.t"], e["diff.c"], 2.5)
    assert abs_err(guided, e["diff.cfg_out"][:N]) <= 1e-5


def test_respaced_schedule_is_exact(tiny4):
    e, scheduler = tiny4["expected"], tiny4["scheduler"]
    scheduler.set_timesteps(8)
    assert torch.equal(scheduler.timestep_map, e["sched.timestep_map"])
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod"):
        assert torch.equal(scheduler.tables[name], e[f"sched.{name}"]), name


def test_residual_sampler_matches_official(case):
    e = case["expected"]
    for cfg, key in ((3.0, "diffsample.out"), (1.0, "diffsample.out_cfg1")):
        out = sample_residual(case["head"], case["scheduler"], e["diffsample.z"], cfg,
                              generator=torch.Generator().manual_seed(5))
        assert abs_err(out, e[key][: out.shape[0]]) <= 1e-5, key  # the official sampler returns both halves


@pytest.mark.parametrize("mode", ["plain", "smooth"])
def test_full_sampling_matches_official(case, mode):
    """Same seeds -> the official token choices at every scale and the official image."""
    e = case["expected"]
    tokens = generate_tokens(case["transformer"], case["vae"], e["ctx"], e["ctx_pos"], patch_nums=case["patch_nums"],
                             guidance_scale=4.5, smooth=mode == "smooth", generator=torch.Generator().manual_seed(7))
    for si, idx in enumerate(tokens.indices):
        assert torch.equal(idx, e[f"sample.{mode}.idx.{si}"]), f"scale {si} tokens differ"
    tokens = add_residual(tokens, case["head"], case["scheduler"], generator=torch.Generator().manual_seed(123))
    assert abs_err(decode_tokens(case["vae"], tokens), e[f"sample.{mode}.image"]) <= 1e-4


def test_attn_l2_norm_sampling_matches_official(tmp_path):
    """The official ``attn_l2_norm`` option (cosine attention, learned per-head temperature ``scale_mul_1H11``):
    converted from the official layout, the official tokens at every scale and its image."""
    from conftest import attn_l2_norm_checkpoint

    dst = str(tmp_path / "diffusers")
    convert(attn_l2_norm_checkpoint(str(tmp_path / "official")), dst)
    transformer = HARTTransformer.from_pretrained(os.path.join(dst, "transformer")).eval()
    assert transformer.config.attn_l2_norm and all(b.attn.scale == 1.0 for b in transformer.blocks)
    head = HARTResidualHead.from_pretrained(os.path.join(dst, "residual_head")).eval()
    vae = HARTHybridTokenizer.from_pretrained(os.path.join(dst, "vae")).eval()
    e = load_file(os.path.join(FIXTURES, "parity", "tiny4", "expected.safetensors"))
    recorded = load_file(os.path.join(FIXTURES, "parity", "tiny4", "attn_l2_norm.safetensors"))
    tokens = generate_tokens(transformer, vae, e["ctx"], e["ctx_pos"], patch_nums=(1, 2, 3, 4), guidance_scale=4.5,
                             smooth=False, generator=torch.Generator().manual_seed(7))
    for si, idx in enumerate(tokens.indices):
        assert torch.equal(idx, recorded[f"idx.{si}"]), f"scale {si} tokens differ"
    # the same checkpoint without the option draws other tokens: the recording depends on it
    plain = e["sample.plain.idx.3"]
    assert not torch.equal(tokens.indices[3], plain)
    tokens = add_residual(tokens, head, HARTResidualScheduler.from_pretrained(os.path.join(dst, "scheduler")),
                          generator=torch.Generator().manual_seed(123))
    assert abs_err(decode_tokens(vae, tokens), recorded["image"]) <= 1e-4


# ------------------------------------------------------------------------------------------------ training step
@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """The official training forward with token dropping was recorded with tiny8 (64 final-scale tokens)."""
    case = _load_case("tiny8", tmp_path_factory)
    root = os.path.join(FIXTURES, "parity", "tiny8")
    case["train"] = load_file(os.path.join(root, "train_forward.safetensors"))
    with open(os.path.join(root, "train_forward.json")) as f:
        case["train_meta"] = json.load(f)
    return case


def _official_training_step(case, backward: bool = True):
    """Our transformer_loss on the official inputs with every random draw replayed (loss backpropagated)."""
    from hart_pipeline.training.losses import TransformerTrainingDraws, transformer_loss

    e, t, patch_nums = case["expected"], case["train"], case["patch_nums"]
    transformer, head, vae = case["transformer"], case["head"], case["vae"]
    scheduler = HARTResidualScheduler.from_config(case["scheduler"].config)
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    indices = [e[f"tok.idx.{si}"] for si in range(len(patch_nums))]
    draws = TransformerTrainingDraws(dropped=torch.zeros(2, dtype=torch.bool), kept_positions=t["train.kept"],
                                     sampled=t["train.sampled"], timesteps=t["train.diff_t"], noise=t["train.diff_noise"])
    transformer.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    out = transformer_loss(transformer, head, vae, scheduler.tables, e["ctx"], e["ctx_pos"], indices, e["tok.residual"],
                           patch_nums=patch_nums, diffusion_batch_mul=case["train_meta"]["diffusion_batch_mul"], draws=draws)
    if backward:
        out.loss.backward()
    return out


def test_training_step_matches_official_with_token_dropping(tiny8):
    t, meta = tiny8["train"], tiny8["train_meta"]
    assert 0 < meta["n_drop"] and t["train.kept"].shape == (2, meta["n_kept"])  # tokens really were dropped
    with torch.no_grad():
        indices = [tiny8["expected"][f"tok.idx.{si}"] for si in range(len(tiny8["patch_nums"]))]
        scale_inputs = tiny8["vae"].quantizer.teacher_forcing_input(indices, tiny8["patch_nums"])
    assert abs_err(scale_inputs, t["train.input"]) <= 1e-5
    out = _official_training_step(tiny8)
    assert out.logits.shape == t["train.logits"].shape  # the dropped tokens left the sequence
    assert rel_err(out.logits, t["train.logits"]) <= 1e-6  # official position ids + attention pattern of the kept
    assert abs(out.ce_loss.item() - t["train.ce"].item()) <= 1e-6 * t["train.ce"].item()
    assert abs(out.diffusion_loss.item() - t["train.diff_loss"].item()) <= 1e-6 * t["train.diff_loss"].item()
    names = {n: n.replace("diffloss.net.", "") for n in meta["grad_names"]}
    params = {**dict(tiny8["transformer"].named_parameters()),
              **{"diffloss.net." + k: v for k, v in tiny8["head"].named_parameters()}}
    for official_name in names:
        grad = params[official_name].grad
        assert rel_err(grad, t["train.grad." + official_name]) <= 1e-5, official_name


def test_training_step_own_sample_matches_official_sampler(tiny8):
    """The head's target and condition come from the model's own top-k 600 / top-p 0.96 sample: with the
    official generator seed, our sampler draws the official indices from our logits."""
    from hart_pipeline.sampling import sample_scale_tokens

    t, meta = tiny8["train"], tiny8["train_meta"]
    with torch.no_grad():
        out = _official_training_step(tiny8, backward=False)
    k = meta["n_kept"]
    codebook = tiny8["vae"].quantizer.embedding.weight
    g = torch.Generator().manual_seed(meta["seeds"]["model_rng"])
    sampled, _ = sample_scale_tokens(out.logits[:, -k:].detach(), codebook, meta["top_k"], meta["top_p"], False, 0.0, g)
    assert torch.equal(sampled, t["train.sampled"])
    assert not torch.equal(sampled, t["train.targets"][:, -k:])  # a sample, not the ground truth
