"""Editing by teacher forcing: HARTImg2ImgPipeline, HARTInpaintPipeline, edit_tokens, masks, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch

from hart_pipeline import (
    HARTImg2ImgPipeline,
    HARTInpaintPipeline,
    HARTPipeline,
    add_residual,
    decode_tokens,
    edit_tokens,
    encode_images,
    generate_tokens,
    outpaint_canvas,
)
from hart_pipeline.sampling import kept_scales, repaint_maps

from conftest import TINY_PATCH_NUMS

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 64, 64, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def box_mask(top=16, bottom=48, left=16, right=48):
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., top:bottom, left:right] = 1
    return mask


def test_kept_scales_rule():
    assert [kept_scales(s, 4) for s in (0.0, 0.2, 0.25, 0.5, 0.99, 1.0)] == [4, 4, 3, 2, 1, 0]
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="strength"):
            kept_scales(bad, 4)


def test_repaint_maps_half_coverage_coarse_any_coverage_final():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :40, :40] = 1  # covers 62.5% of the 2x2 scale's first token, part of a 4x4 token
    maps = repaint_maps(mask, TINY_PATCH_NUMS)
    assert maps[0].tolist() == [[False]]  # 39% of the image
    assert maps[1].view(2, 2).tolist() == [[True, False], [False, False]]
    final = maps[3].view(4, 4)
    assert final[:3, :3].all() and not final[3].any() and not final[:, 3].any()  # 40 px reaches into the 3rd token
    half = repaint_maps(box_mask(0, 64, 32, 64), TINY_PATCH_NUMS)
    assert half[0].tolist() == [[False]] and half[2].view(3, 3)[:, 1].tolist() == [False] * 3  # exactly half: kept


def test_inpaint_keeps_every_outside_token_and_changes_the_inside(pipe, image):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    mask = box_mask()
    tokens = inpaint(PROMPT, image=image, mask_image=mask, generator=gen(), output_type="latent").images
    original = encode_images(pipe.vae, image)
    repaint = repaint_maps(mask, TINY_PATCH_NUMS)
    changed = 0
    for si, (idx, ref, inside) in enumerate(zip(tokens.indices, original.indices, repaint)):
        assert torch.equal(idx[~inside], ref[~inside]), f"scale {si}: a token outside the mask changed"
        changed += int((idx[inside] != ref[inside]).sum())
    assert changed > 0
    inside = repaint[-1].view(1, 1, 4, 4).expand_as(tokens.residual)
    assert torch.equal(tokens.residual[~inside], original.residual[~inside])  # the image's own residual outside
    assert not torch.allclose(tokens.residual[inside], original.residual[inside])  # re-sampled inside


def test_inpaint_blend_restores_the_outside_pixels(pipe, image):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    mask = box_mask()
    out = inpaint(PROMPT, image=image, mask_image=mask, blend_original=True, generator=gen(), output_type="pt").images
    plain = inpaint(PROMPT, image=image, mask_image=mask, generator=gen(), output_type="pt").images
    outside = mask.expand_as(out) == 0
    assert torch.allclose(out[outside], image[outside], atol=1e-6)
    assert torch.equal(out[~outside], plain[~outside])


def test_img2img_strength_zero_is_the_reconstruction_and_one_is_text_to_image(pipe, image):
    img2img = HARTImg2ImgPipeline.from_pipe(pipe)
    reconstruction = decode_tokens(pipe.vae, encode_images(pipe.vae, image))
    out = img2img(PROMPT, image=image, strength=0.0, generator=gen(), output_type="pt").images
    assert torch.equal(out, reconstruction)
    t2i = pipe(PROMPT, generator=gen(5), output_type="pt").images
    out = img2img(PROMPT, image=image, strength=1.0, generator=gen(5), output_type="pt").images
    assert torch.equal(out, t2i)


def test_edit_pipelines_take_the_residual_guidance(pipe, image):
    for edit, extra in ((HARTImg2ImgPipeline.from_pipe(pipe), {}), (HARTInpaintPipeline.from_pipe(pipe), {"mask_image": box_mask()})):
        tokens = edit(PROMPT, image=image, generator=gen(), output_type="latent", residual_guidance_scale=0.0, **extra).images
        default = edit(PROMPT, image=image, generator=gen(), output_type="latent", **extra).images
        assert tokens.residual_guidance == 0.0 < default.residual_guidance
        assert torch.equal(tokens.latent, default.latent) and not torch.allclose(tokens.residual, default.residual)
        with pytest.raises(ValueError, match="residual_guidance_scale"):
            edit(PROMPT, image=image, residual_guidance_scale="high", **extra)


def test_img2img_keeps_the_coarse_scales(pipe, image):
    img2img = HARTImg2ImgPipeline.from_pipe(pipe)
    tokens = img2img(PROMPT, image=image, strength=0.5, generator=gen(), output_type="latent").images
    original = encode_images(pipe.vae, image)
    assert all(torch.equal(a, b) for a, b in zip(tokens.indices[:2], original.indices[:2]))
    assert not torch.equal(tokens.indices[3], original.indices[3])


def test_inpaint_empty_mask_is_the_reconstruction_and_full_mask_is_text_to_image(pipe, image):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    reconstruction = decode_tokens(pipe.vae, encode_images(pipe.vae, image))
    out = inpaint(PROMPT, image=image, mask_image=np.zeros((64, 64), dtype=np.float32), generator=gen(),
                  output_type="pt").images
    assert torch.equal(out, reconstruction)
    t2i = pipe(PROMPT, generator=gen(2), output_type="pt").images
    full = PIL.Image.new("L", (64, 64), 255)
    assert torch.equal(inpaint(PROMPT, image=image, mask_image=full, generator=gen(2), output_type="pt").images, t2i)


def test_inputs_pil_numpy_tensor_agree(pipe, image):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    mask = box_mask()
    as_pil = PIL.Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    quantized = torch.from_numpy(np.asarray(as_pil) / 255.0).float().permute(2, 0, 1)[None]
    mask_pil = PIL.Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8))
    runs = [inpaint(PROMPT, image=img, mask_image=m, generator=gen(), output_type="pt").images
            for img, m in ((as_pil, mask_pil), (quantized, mask), (quantized.permute(0, 2, 3, 1).numpy(), mask[0, 0].numpy()))]
    assert torch.allclose(runs[0], runs[1], atol=1e-5) and torch.allclose(runs[1], runs[2], atol=1e-5)


def test_outpainting_on_a_padded_canvas(pipe):
    small = PIL.Image.new("RGB", (32, 32), (200, 30, 30))
    canvas, mask = outpaint_canvas(small, 64)
    m = np.asarray(mask)
    assert canvas.size == (64, 64) and m[16:48, 16:48].max() == 0 and m[:16].min() == 255
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    out = inpaint(PROMPT, image=canvas, mask_image=mask, generator=gen(), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="does not fit"):
        outpaint_canvas(small, 48, left=20)


def test_edit_pipelines_share_and_load_components(pipe, tmp_path):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    assert inpaint.transformer is pipe.transformer and inpaint.vae is pipe.vae
    pipe.save_pretrained(tmp_path)
    loaded = HARTImg2ImgPipeline.from_pretrained(tmp_path, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    assert isinstance(loaded, HARTImg2ImgPipeline)
    assert isinstance(HARTPipeline.from_pretrained(tmp_path), HARTPipeline)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=1.2), "strength"),
    (dict(strength=-0.5), "strength"),
    (dict(mask_image=torch.zeros(1, 1, 32, 32)), "mask_image.*size"),
    (dict(mask_image="mask.png"), "mask_image"),
    (dict(mask_image=None), "mask_image"),
    (dict(image=torch.rand(1, 3, 48, 48), mask_image=torch.zeros(48, 48)), "square images of"),
    (dict(image=torch.rand(1, 3, 64, 32), mask_image=torch.zeros(64, 32)), "square images of"),
    (dict(image=None), "image"),
    (dict(height=100, width=100), "square images"),
])
def test_bad_input(pipe, image, kwargs, match):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    args = dict(image=image, mask_image=box_mask(), generator=gen())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        inpaint(PROMPT, **args)


def test_mask_batch_must_match(pipe, image):
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="mask"):
        inpaint([PROMPT, PROMPT], image=image, mask_image=box_mask().repeat(3, 1, 1, 1), generator=gen())


def test_residual_positions_keep_the_rest(pipe, image):
    """add_residual re-samples only the listed positions; the others keep the given residual."""
    original = encode_images(pipe.vae, image)
    embeds, positions, _, _ = pipe.encode_prompt(PROMPT)
    tokens = edit_tokens(pipe.transformer, pipe.vae, original, embeds, positions, strength=0.3, generator=gen())
    assert torch.equal(tokens.residual, original.residual)  # the image's, until add_residual
    tokens.residual_positions = [torch.zeros(1, 16, dtype=torch.bool)]
    tokens.residual_positions[0][0, :5] = True
    tokens = add_residual(tokens, pipe.residual_head, pipe.scheduler, generator=gen())
    flat, ref = tokens.residual.flatten(2), original.residual.flatten(2)
    assert torch.equal(flat[..., 5:], ref[..., 5:]) and not torch.allclose(flat[..., :5], ref[..., :5])


def test_a_whole_prefix_still_gets_a_sampled_residual(pipe, image):
    """prefix_indices without masks (teacher forcing every scale) keep the old meaning: the residual is sampled."""
    original = encode_images(pipe.vae, image)
    embeds, positions, _, _ = pipe.encode_prompt(PROMPT)
    tokens = generate_tokens(pipe.transformer, pipe.vae, embeds, positions, prefix_indices=original.indices)
    assert tokens.residual_positions is None
    tokens = add_residual(tokens, pipe.residual_head, pipe.scheduler, generator=gen())
    assert tokens.residual is not None and not torch.equal(tokens.residual, original.residual)
