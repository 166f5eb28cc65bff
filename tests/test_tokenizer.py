"""HARTHybridTokenizer: encode/decode shapes, hybrid reconstruction identity, and input validation."""

import copy

import pytest
import torch

from hart_pipeline import PATCH_NUMS, HARTHybridTokenizer, HARTTransformer, patch_nums_for_resolution

from conftest import tiny_vae

PATCH_8 = (1, 2, 3, 4, 5, 6, 7, 8)


def _images(batch, side, seed=0):
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vae4():
    return tiny_vae()


@pytest.fixture(scope="module")
def vae8():
    return tiny_vae(PATCH_8, seed=1)


CASES = {64: (1, 2, 3, 4), 128: PATCH_8}


@pytest.fixture(scope="module", params=sorted(CASES))
def encoded(request, vae4, vae8):
    """Encode/decode every configuration once (fp32); the tests below check the results."""
    side = request.param
    vae = vae4 if side == 64 else vae8
    images = _images(2 if side == 64 else 1, side, seed=3)
    with torch.no_grad():
        tokens = vae.encode(images)  # default schedule = the configured one
        latent = vae.encode_latent(images)
        out = {
            "side": side, "vae": vae, "patch_nums": CASES[side], "tokens": tokens, "latent": latent,
            "fhat": vae.quantizer.indices_to_latent(tokens.indices, CASES[side]),
            "hybrid": vae.decode(tokens.indices, tokens.residual).sample,
            "discrete": vae.decode(tokens.indices).sample,
            "reference": vae.decode_latent(latent),
        }
    return out


def test_encode_decode_shapes(encoded):
    side, patch_nums, tokens = encoded["side"], encoded["patch_nums"], encoded["tokens"]
    B, last = encoded["latent"].shape[0], patch_nums[-1]
    assert encoded["latent"].shape == (B, 16, last, last)
    assert [tuple(i.shape) for i in tokens.indices] == [(B, pn * pn) for pn in patch_nums]
    assert all(i.dtype == torch.int64 and 0 <= i.min() and i.max() < 1024 for i in tokens.indices)
    assert tokens.residual.shape == (B, 16, last, last)
    assert encoded["hybrid"].shape == encoded["discrete"].shape == (B, 3, side, side)
    assert encoded["hybrid"].abs().max() <= 1 and encoded["discrete"].abs().max() <= 1
    # the codes are informative: more than one code is used at the last scale
    assert tokens.indices[-1].unique().numel() > 1


def test_hybrid_decode_reconstructs_continuous_latent(encoded):
    tokens = encoded["tokens"]
    assert (encoded["fhat"] + tokens.residual - encoded["latent"]).abs().max() <= 1e-5
    # fp32 round-off of the latent identity (~1e-7) is amplified by the random-weight decoder to ~1e-5
    assert (encoded["hybrid"] - encoded["reference"]).abs().max() <= 1e-4
    assert (encoded["discrete"] - encoded["reference"]).abs().max() > 1e-3  # the residual carries real information
    assert tokens.residual.abs().max() > 1e-3


@pytest.mark.parametrize("side", sorted(CASES))
def test_hybrid_decode_identity_float64(vae4, vae8, side):
    """The identity decode(indices, residual) == decode_latent(encode_latent(x)) holds to 1e-10 in float64."""
    vae = copy.deepcopy(vae4 if side == 64 else vae8).double()
    images = _images(1, side, seed=4).double()
    with torch.no_grad():
        latent = vae.encode_latent(images)
        indices, residual = vae.quantizer.quantize(latent, CASES[side])
        hybrid = vae.decode(indices, residual).sample
        reference = vae.decode_latent(latent)
    assert hybrid.dtype == torch.float64
    assert (hybrid - reference).abs().max() <= 1e-10


def test_explicit_patch_nums_and_return_tuple(vae4):
    images = _images(1, 64)
    with torch.no_grad():
        indices, residual = vae4.encode(images, patch_nums=(2, 4), return_dict=False)
        (image,) = vae4.decode(indices, residual, return_dict=False)
    assert [tuple(i.shape) for i in indices] == [(1, 4), (1, 16)]
    assert image.shape == (1, 3, 64, 64)


def test_teacher_forcing_input_matches_running_latent(vae4):
    """Input of scale si+1 = area-downsampled sum of the contributions of scales 0..si."""
    images = _images(2, 64)
    pns = (1, 2, 3, 4)
    with torch.no_grad():
        tokens = vae4.encode(images)
        inputs = vae4.quantizer.teacher_forcing_input(tokens.indices, pns)
        assert inputs.shape == (2, 4 + 9 + 16, 16)
        partial = vae4.quantizer.indices_to_latent(tokens.indices[:3], pns)  # scales 0..2, none is the last
        last_input = torch.nn.functional.interpolate(partial, size=(4, 4), mode="area").flatten(2).transpose(1, 2)
    assert torch.allclose(inputs[:, -16:], last_input, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- validation
def test_wrong_channel_count(vae4):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae4.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae4.encode_latent(torch.zeros(3, 64, 64))


def test_side_not_multiple_of_16(vae4):
    with pytest.raises(ValueError, match="multiples of 16.*72x72"):
        vae4.encode(torch.zeros(1, 3, 72, 72))
    with pytest.raises(ValueError, match="multiples of 16"):
        vae4.encode_latent(torch.zeros(1, 3, 64, 40))


def test_non_square_image(vae4):
    with pytest.raises(ValueError, match="square"):
        vae4.encode(torch.zeros(1, 3, 64, 32))


def test_patch_nums_must_end_with_latent_side(vae4):
    with pytest.raises(ValueError, match=r"must end with 4; got \(1, 2, 3\)"):
        vae4.encode(_images(1, 64), patch_nums=(1, 2, 3))
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        vae4.encode(_images(1, 64), patch_nums=(1, 5, 4))
    # the configured schedule (last side 4) does not fit a 128px image and 128 has no standard schedule
    with pytest.raises(ValueError, match=r"must end with 8"):
        vae4.encode(_images(1, 128))


def test_wrong_indices_shapes(vae4):
    good = [torch.zeros(2, pn * pn, dtype=torch.long) for pn in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match="at least one scale"):
        vae4.decode([])
    with pytest.raises(ValueError, match=r"indices\[2\] has 8 tokens"):
        vae4.decode(good[:2] + [torch.zeros(2, 8, dtype=torch.long)] + good[3:])
    with pytest.raises(ValueError, match=r"indices\[1\] must be an integer tensor of shape \(2, pn \* pn\)"):
        vae4.decode(good[:1] + [torch.zeros(3, 4, dtype=torch.long)] + good[2:])
    with pytest.raises(ValueError, match=r"indices\[0\]"):
        vae4.decode([torch.zeros(2, 1, 1, dtype=torch.long)] + good[1:])
    with pytest.raises(ValueError, match=r"indices\[3\].*float32"):
        vae4.decode(good[:3] + [torch.zeros(2, 16)])
    with pytest.raises(ValueError, match=r"`residual` must have shape \(2, 16, 4, 4\)"):
        vae4.decode(good, residual=torch.zeros(2, 16, 8, 8))


def test_decode_latent_wrong_channels(vae4):
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        vae4.decode_latent(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("side, expected", [(128, PATCH_NUMS[256]), (256, PATCH_NUMS[512])])
def test_standard_schedule_follows_the_downsample_factor(side, expected):
    """Regression: the default schedule of an image was picked by its side (factor 16 assumed); a factor-8
    tokenizer (the built-in model's) failed with a size mismatch on a 256px image."""
    torch.manual_seed(0)
    vae = HARTHybridTokenizer(latent_channels=8, vocab_size=64, base_channels=32, channel_multipliers=(1, 1, 2, 2),
                              num_res_blocks=1, patch_nums=(1, 2, 4, 8)).eval()
    assert vae.downsample_factor == 8
    with torch.no_grad():
        indices, residual = vae.encode(_images(1, side), return_dict=False)
    assert vae.patch_nums_from_indices(indices) == expected
    assert residual.shape == (1, 8, side // 8, side // 8)
    assert patch_nums_for_resolution(side, downsample_factor=8) == expected
    with pytest.raises(ValueError, match="square images of side 128, 256, 512"):
        patch_nums_for_resolution(64 * 3, downsample_factor=8)


def test_builtin_tokenizer_encodes_every_size_the_pipeline_generates():
    """Regression: the built-in model (downsample factor 8) generated 256px images but could not encode them."""
    from hart_pipeline.default_model import DEFAULT_MODEL_DIR
    from hart_pipeline.schedules import supported_sizes

    vae = HARTHybridTokenizer.from_pretrained(DEFAULT_MODEL_DIR, subfolder="vae").eval()
    transformer_config = HARTTransformer.load_config(DEFAULT_MODEL_DIR, subfolder="transformer")
    sizes = supported_sizes(transformer_config["patch_nums"], vae.downsample_factor)  # what pipe(height=...) uses
    assert sorted(sizes) == [64, 128, 256, 512]
    for side in (128, 256):
        with torch.no_grad():
            indices, residual = vae.encode(_images(1, side), return_dict=False)
        assert vae.patch_nums_from_indices(indices) == sizes[side]
        assert residual.shape[-1] == side // 8


def test_inference_decode_in_place_is_bit_identical_and_training_keeps_its_graph():
    """Without grad the decoder's activations and residual adds run in place (the official decoder's
    ``silu(inplace=True)``; ~10% of a 256px decode on CPU): the very same image as the out-of-place graph mode."""
    torch.manual_seed(0)
    vae = HARTHybridTokenizer(latent_channels=8, vocab_size=64, base_channels=32, channel_multipliers=(1, 2, 2),
                              patch_nums=(1, 2, 4)).eval()
    latent = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        in_place = vae.decode_latent(latent)
    latent.requires_grad_(True)
    graph = vae.decode_latent(latent)
    assert torch.equal(in_place, graph.detach())
    graph.square().mean().backward()
    assert latent.grad is not None and torch.isfinite(latent.grad).all() and latent.grad.abs().sum() > 0
