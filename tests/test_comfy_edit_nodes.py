"""The ComfyUI variation and inpaint nodes: same images as the editing pipelines, masks, bad input."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from comfy_nodes import nodes as N  # noqa: E402
from comfy_nodes.handles import HARTModel  # noqa: E402

from hart_pipeline import HARTImg2ImgPipeline, HARTInpaintPipeline, encode_images  # noqa: E402


PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def model(pipe):
    return HARTModel(pipe=pipe, name="tiny", device=torch.device("cpu"), offload_device=torch.device("cpu"),
                     dtype=torch.float32)


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))  # ComfyUI IMAGE (B, H, W, C)


def finish(model, tokens):
    (tokens,) = N.residual_diffusion(model, tokens, steps=8, guidance=-1.0, seed=-1)
    (out,) = N.tokenizer_decode(model, tokens, discrete_only=False)
    return out, tokens


def test_variation_node_gives_the_img2img_pipeline_image(pipe, model, image):
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.variation(model, pos, image, seed=3, guidance=4.5, strength=0.5, batch_size=1)
    out, _ = finish(model, tokens)
    expected = HARTImg2ImgPipeline.from_pipe(pipe)(PROMPT, image=image.permute(0, 3, 1, 2), strength=0.5,
                                                   generator=torch.Generator().manual_seed(3), output_type="np").images
    assert torch.allclose(out, torch.from_numpy(expected), atol=1e-6)


def test_inpaint_node_gives_the_inpaint_pipeline_image_and_keeps_the_outside(pipe, model, image):
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.inpaint(model, pos, image, mask, seed=1, guidance=4.5, strength=1.0, batch_size=1)
    out, tokens = finish(model, tokens)
    expected = HARTInpaintPipeline.from_pipe(pipe)(PROMPT, image=image.permute(0, 3, 1, 2), mask_image=mask,
                                                   generator=torch.Generator().manual_seed(1), output_type="np").images
    assert torch.allclose(out, torch.from_numpy(expected), atol=1e-6)
    original = encode_images(pipe.vae, image.permute(0, 3, 1, 2))
    left = torch.arange(4).repeat(4) < 2  # final-scale tokens of the left half
    assert torch.equal(tokens.tokens.indices[-1][:, left], original.indices[-1][:, left])


def test_empty_mask_passes_the_reconstruction_through(model, image):
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.inpaint(model, pos, image, torch.zeros(1, 64, 64), seed=0, guidance=4.5, strength=1.0, batch_size=1)
    out, _ = finish(model, tokens)
    (encoded,) = N.tokenizer_encode(model, image, "auto")
    (reconstruction,) = N.tokenizer_decode(model, encoded, discrete_only=False)
    assert torch.equal(out, reconstruction)


@pytest.mark.parametrize("mask, match", [(torch.zeros(32, 32), "size"), (torch.zeros(1, 1, 64, 64), "MASK")])
def test_bad_masks(model, image, mask, match):
    (pos,) = N.text_encode(model, PROMPT)
    with pytest.raises(ValueError, match=match):
        N.inpaint(model, pos, image, mask, seed=0, guidance=4.5, strength=1.0, batch_size=1)
