"""Modular Diffusers: HART's stages as blocks give HARTPipeline's image for the same seed."""

import numpy as np
import pytest
import torch

from hart_pipeline import HARTTokens
from hart_pipeline.modular import HARTAutoregressiveStep, HARTBlocks, HARTTextEncoderStep

from conftest import tiny_pipeline

PROMPTS = ["a red circle above a blue square", "two green triangle"]


@pytest.fixture(scope="module")
def pipes():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    modular = HARTBlocks().init_pipeline()
    modular.update_components(**pipe.components)
    modular.register_to_config(use_system_prompt=pipe.config.use_system_prompt)
    return pipe, modular


@pytest.mark.parametrize("kwargs", [dict(), dict(negative_prompt="blue", guidance_scale=2.0, smooth=False),
                                    dict(num_images_per_prompt=2, top_k=50, num_inference_steps=4),
                                    dict(residual_guidance_scale=0.0)])
def test_blocks_give_the_pipeline_image(pipes, kwargs):
    pipe, modular = pipes
    kwargs = {"num_inference_steps": 3, **kwargs}
    expected = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images
    images = modular(prompt=PROMPTS, output_type="np", generator=torch.Generator().manual_seed(0), output="images", **kwargs)
    assert np.array_equal(images, expected)


def test_blocks_run_separately(pipes):
    pipe, modular = pipes
    assert [name for name, _ in HARTBlocks().sub_blocks.items()] == ["text_encoder", "autoregressive", "residual", "decode"]
    text = HARTTextEncoderStep().init_pipeline()
    text.update_components(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=pipe.transformer)
    state = text(prompt=PROMPTS[0])
    embeds, positions, _, _ = pipe.encode_prompt(PROMPTS[0])
    assert torch.equal(state.get("prompt_embeds"), embeds) and torch.equal(state.get("prompt_position_ids"), positions)
    ar = HARTAutoregressiveStep().init_pipeline()
    ar.update_components(transformer=pipe.transformer, vae=pipe.vae)
    tokens = ar(prompt_embeds=embeds, prompt_position_ids=positions, generator=torch.Generator().manual_seed(0),
                output="tokens")
    expected = pipe(PROMPTS[0], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert isinstance(tokens, HARTTokens) and tokens.residual is None
    assert all(torch.equal(a, b) for a, b in zip(tokens.indices, expected.indices))


def test_bad_residual_guidance(pipes):
    _, modular = pipes
    with pytest.raises(ValueError, match="`guidance_scale` must be a real number >= 0.0"):
        modular(prompt=PROMPTS[0], residual_guidance_scale=-2.0, num_inference_steps=2, output="images")


def test_bad_output_type(pipes):
    _, modular = pipes
    with pytest.raises(ValueError, match="output_type"):
        modular(prompt=PROMPTS[0], output_type="jpeg", num_inference_steps=2, output="images")
