"""HARTTransformer / HARTResidualHead / HARTHybridTokenizer: released config, teacher forcing vs KV cache,
padding, save/load round trips and bf16."""

import json
import os

import pytest
import torch

from hart_pipeline import (
    HARTHybridTokenizer,
    HARTResidualHead,
    HARTResidualScheduler,
    HARTTransformer,
    add_residual,
    decode_tokens,
    generate_tokens,
)
from hart_pipeline.convert import map_official_tokenizer_state, split_official_transformer_state
from hart_pipeline.models.transformer import KVCache

from conftest import FIXTURES, teacher_forced_hidden_states, text_condition, tiny_head, tiny_transformer, tiny_vae


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def released():
    with torch.device("meta"):
        return {"transformer": HARTTransformer(), "head": HARTResidualHead(), "vae": HARTHybridTokenizer()}


@pytest.fixture(scope="module")
def official_shapes():
    with open(os.path.join(FIXTURES, "released_state_dict_shapes.json")) as f:
        return json.load(f)


def _fake_state(table: dict) -> dict:
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k == "lvl_1L" else torch.float32)
            for k, s in table.items()}


# ----------------------------------------------------------------------------- released configuration
def test_released_parameter_counts(released):
    # SPEC §1: transformer incl. diffusion MLP 732,399,168, diffusion MLP 36,585,536, VAE 108,948,355
    assert num_params(released["head"]) == 36_585_536
    assert num_params(released["transformer"]) + num_params(released["head"]) == 732_399_168
    assert num_params(released["vae"]) == 108_948_355
    assert all(p.is_meta for p in released["transformer"].parameters())


def test_released_state_dict_keys_and_shapes(released, official_shapes):
    assert len(official_shapes["transformer"]) == 317 and len(official_shapes["tokenizer"]) == 346
    trunk, head = split_official_transformer_state(_fake_state(official_shapes["transformer"]))
    assert shapes(trunk) == shapes(released["transformer"].state_dict())
    assert shapes(head) == shapes(released["head"].state_dict())
    vae = map_official_tokenizer_state(_fake_state(official_shapes["tokenizer"]))
    assert shapes(vae) == shapes(released["vae"].state_dict())
    # the official tokenizer parameters minus codebook-usage buffer and discriminator = our count
    official_vae = sum(torch.Size(s).numel() for k, s in official_shapes["tokenizer"].items()
                       if k.startswith("vae.") and k != "vae.quantize.ema_vocab_hit_SV")
    assert official_vae == num_params(released["vae"])


# ----------------------------------------------------------------------------- teacher forcing vs KV cache
def _random_indices(patch_nums, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (batch, pn * pn), generator=g) for pn in patch_nums]


@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8)])
def test_teacher_forced_forward_equals_kv_cached(patch_nums):
    transformer, vae = tiny_transformer(patch_nums, seed=1), tiny_vae(patch_nums, seed=2)
    B = 2
    context, position_ids = text_condition(B, 8, 32, seed=3)
    indices = _random_indices(patch_nums, B, seed=4)

    tokens, hidden = teacher_forced_hidden_states(transformer, vae, context, position_ids, indices, patch_nums)
    assert len(hidden) == len(patch_nums)
    assert all(torch.equal(a, b) for a, b in zip(tokens.indices, indices))

    with torch.no_grad():
        scale_inputs = vae.quantizer.teacher_forcing_input(indices, patch_nums)
        assert scale_inputs.shape == (B, sum(pn * pn for pn in patch_nums) - 1, 16)
        out = transformer(context, position_ids, scale_inputs, patch_nums=patch_nums)
        assert out.logits.shape == (B, sum(pn * pn for pn in patch_nums), 1024)
        modulation = transformer.head_modulation(transformer.embed_context(context))
        start = 0
        for si, (h, pn) in enumerate(zip(hidden, patch_nums)):
            h = h[:B, -1:] if si == 0 else h[:B]  # conditional rows
            cached = transformer.logits(h, modulation)
            forced = out.logits[:, start:start + pn * pn]
            assert cached.shape == forced.shape
            assert rel_err(cached, forced) <= 1e-5, f"scale {si}"
            assert rel_err(h, out.hidden_states[:, start:start + pn * pn]) <= 1e-5, f"scale {si}"
            start += pn * pn
        # the residual-head condition of the cached path uses the same final-scale hidden states
        last = patch_nums[-1] ** 2
        cond = transformer.residual_condition(out.hidden_states[:, -last:], vae.quantizer.embedding(indices[-1]))
        assert rel_err(tokens.residual_condition[:B], cond) <= 1e-5


def test_attention_dtype_processor():
    """HARTAttnProcessor(attention_dtype=bf16): attention and KV cache in bf16, logits close to fp32's; the default
    processor (None) gives the same logits bit for bit."""
    from hart_pipeline.models.transformer import HARTAttnProcessor

    patch_nums = (1, 2, 3, 4)
    transformer, vae = tiny_transformer(patch_nums, seed=1), tiny_vae(patch_nums, seed=2)
    context, position_ids = text_condition(2, 8, 32, seed=3)
    indices = _random_indices(patch_nums, 2, seed=4)
    with torch.no_grad():
        scale_inputs = vae.quantizer.teacher_forcing_input(indices, patch_nums)
        reference = transformer(context, position_ids, scale_inputs, patch_nums=patch_nums).logits
        transformer.set_attn_processor(HARTAttnProcessor())
        assert torch.equal(transformer(context, position_ids, scale_inputs, patch_nums=patch_nums).logits, reference)
        transformer.set_attn_processor(HARTAttnProcessor(attention_dtype=torch.bfloat16))
        assert len(transformer.attn_processors) == transformer.config.num_layers
        assert transformer.new_kv_cache(2, patch_nums, 8).keys.dtype == torch.bfloat16
        low = transformer(context, position_ids, scale_inputs, patch_nums=patch_nums).logits
        assert low.dtype == torch.float32 and not torch.equal(low, reference)
        assert rel_err(low, reference) <= 3e-2
        tokens = generate_tokens(transformer, vae, context, position_ids, patch_nums=patch_nums,
                                 generator=torch.Generator().manual_seed(0))
        assert [t.shape for t in tokens.indices] == [(2, pn * pn) for pn in patch_nums]


def test_kv_cache_overflow():
    cache = KVCache(num_layers=1, batch_size=1, num_heads=2, max_length=5, head_dim=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    k = torch.randn(1, 2, 3, 4)
    keys, values = cache.layers[0].update(k, k + 1)
    assert torch.equal(keys, k) and torch.equal(values, k + 1)
    cache.advance(3)
    keys, _ = cache.layers[0].update(k[:, :, :2], k[:, :, :2])
    assert keys.shape == (1, 2, 5, 4) and torch.equal(keys[:, :, :3], k)
    cache.advance(2)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.layers[0].update(k[:, :, :1], k[:, :, :1])


def test_kv_cache_is_sized_for_one_generation():
    transformer = tiny_transformer()
    cache = transformer.new_kv_cache(4, (1, 2, 3, 4), 8)
    assert cache.keys.shape == (2, 4, 4, 8 + 30 - 1, 16)


def test_forward_rejects_wrong_number_of_scale_inputs(transformer):
    context, position_ids = text_condition()
    with pytest.raises(ValueError, match=r"sum\(pn\^2\) - 1 = 29"):
        transformer(context, position_ids, torch.zeros(2, 30, 16), patch_nums=(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"= 38\."):
        transformer(context, position_ids, torch.zeros(2, 30, 16), patch_nums=(1, 2, 3, 3, 4))


def test_wrong_context_width_raises(transformer):
    context, position_ids = text_condition(dim=48)
    with pytest.raises(ValueError, match="context_dim=32"):
        transformer(context, position_ids, torch.zeros(2, 29, 16))


def test_text_padding_is_attended(transformer):
    """Official behaviour: padded text positions are attended to (and max-pooled by the head AdaLN)."""
    context, position_ids = text_condition(batch=2, tokens=8)  # row 1 has 3 padded positions
    inputs = torch.randn(2, 29, 16, generator=torch.Generator().manual_seed(1))
    changed = context.clone()
    changed[1, -3:] = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = transformer(context, position_ids, inputs).logits
        b = transformer(changed, position_ids, inputs).logits
    assert torch.equal(a[0], b[0])  # rows are independent
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_image_tokens_are_block_causal(transformer):
    """Changing the input of the last scale must not change the logits of earlier scales."""
    context, position_ids = text_condition()
    inputs = torch.randn(2, 29, 16, generator=torch.Generator().manual_seed(1))
    changed = inputs.clone()
    changed[:, -16:] += 1.0
    with torch.no_grad():
        a = transformer(context, position_ids, inputs).logits
        b = transformer(context, position_ids, changed).logits
    assert torch.allclose(a[:, :14], b[:, :14], atol=1e-6, rtol=0)
    assert (a[:, 14:] - b[:, 14:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- save / load
def _safetensors_file(folder):
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert files, os.listdir(folder)
    assert os.path.isfile(os.path.join(folder, "config.json"))


def test_save_load_round_trip(tmp_path):
    transformer, head, vae = tiny_transformer(seed=5), tiny_head(seed=6), tiny_vae(seed=7)
    for name, model in (("transformer", transformer), ("head", head), ("vae", vae)):
        model.save_pretrained(tmp_path / name)
        _safetensors_file(tmp_path / name)
    transformer2 = HARTTransformer.from_pretrained(tmp_path / "transformer").eval()
    head2 = HARTResidualHead.from_pretrained(tmp_path / "head").eval()
    vae2 = HARTHybridTokenizer.from_pretrained(tmp_path / "vae").eval()
    for model, loaded in ((transformer, transformer2), (head, head2), (vae, vae2)):
        public = lambda cfg: {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in cfg.items()
                              if not k.startswith("_")}
        assert public(loaded.config) == public(model.config)
    assert tuple(transformer2.config.patch_nums) == (1, 2, 3, 4)

    context, position_ids = text_condition()
    inputs = torch.randn(2, 29, 16, generator=torch.Generator().manual_seed(1))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x, t, c = torch.randn(3, 16), torch.tensor([0, 500, 999]), torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(transformer(context, position_ids, inputs).logits,
                           transformer2(context, position_ids, inputs).logits)
        assert torch.equal(head(x, t, c), head2(x, t, c))
        tokens, tokens2 = vae.encode(images), vae2.encode(images)
        assert all(torch.equal(a, b) for a, b in zip(tokens.indices, tokens2.indices))
        assert torch.equal(tokens.residual, tokens2.residual)
        assert torch.equal(vae.decode(tokens.indices, tokens.residual).sample,
                           vae2.decode(tokens.indices, tokens.residual).sample)


def test_scheduler_save_load_round_trip(tmp_path):
    scheduler = HARTResidualScheduler(num_train_timesteps=500, clip_sample=False)
    scheduler.save_pretrained(tmp_path)
    loaded = HARTResidualScheduler.from_pretrained(tmp_path)
    assert loaded.config.num_train_timesteps == 500 and loaded.config.clip_sample is False
    scheduler.set_timesteps(8)
    loaded.set_timesteps(8)
    assert torch.equal(scheduler.timesteps, loaded.timesteps)
    assert scheduler.tables.keys() == loaded.tables.keys()
    for name in scheduler.tables:
        assert torch.equal(scheduler.tables[name], loaded.tables[name]), name


# ----------------------------------------------------------------------------- bf16
def test_bf16_end_to_end():
    transformer = tiny_transformer().to(torch.bfloat16)
    head = tiny_head().to(torch.bfloat16)
    vae = tiny_vae().to(torch.bfloat16)
    context, position_ids = text_condition()
    tokens = generate_tokens(transformer, vae, context, position_ids, guidance_scale=4.5, smooth=True,
                             generator=torch.Generator().manual_seed(0))
    assert [idx.shape for idx in tokens.indices] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert tokens.latent.dtype == torch.bfloat16
    tokens = add_residual(tokens, head, HARTResidualScheduler(), generator=torch.Generator().manual_seed(1))
    assert tokens.residual.shape == (2, 16, 4, 4) and torch.isfinite(tokens.residual.float()).all()
    images = decode_tokens(vae, tokens)
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images.float()).all()
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_blocks_capture_each_scale_once(dynamic):
    """The AR loop is compile-ready (issue 27): blocks get their own KV-cache slice (no layer index), so
    ``compile_repeated_blocks`` traces a scale's block forward without graph breaks, at most once per scale shape
    (once in all with dynamic shapes) over 12 layers and two generations, and samples the same tokens as eager.
    (Dynamo's "eager" backend: the capture is what is tested, not a compiler.)"""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from conftest import tiny_pipeline
    from hart_pipeline import HARTTransformer, generate_tokens

    pipe = tiny_pipeline()
    torch.manual_seed(0)
    transformer = HARTTransformer.from_config({**pipe.transformer.config, "num_layers": 12}).eval()
    T, C = transformer.config.context_tokens, transformer.config.context_dim
    context, positions = torch.randn(1, T, C), torch.arange(T)[None]

    def sample():
        with torch.no_grad():
            return generate_tokens(transformer, pipe.vae, context, positions, generator=torch.Generator().manual_seed(0))

    eager = sample()
    dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(dynamic=dynamic, backend="eager")
    try:
        runs = [sample(), sample()]
    finally:
        dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    num_scales = len(transformer.config.patch_nums)
    assert counters["frames"]["ok"] == counters["frames"]["total"] <= (1 if dynamic else num_scales)
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(eager.indices, run.indices))
        assert torch.equal(eager.residual_condition, run.residual_condition)
