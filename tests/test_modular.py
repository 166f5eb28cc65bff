"""Modular Diffusers: HART's stages as blocks give HARTPipeline's image for the same seed."""

import numpy as np
import pytest
import torch

from hart_pipeline import HARTTokens
from hart_pipeline.modular import HARTAutoregressiveStep, HARTBlocks, HARTTextEncoderStep

from conftest import WITHOUT_PACKAGE_PRELUDE, tiny_pipeline

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


def test_blocks_are_exported_at_the_package_top_level():
    import hart_pipeline

    assert hart_pipeline.HARTBlocks is HARTBlocks
    assert set(HARTBlocks().sub_blocks) == {"text_encoder", "autoregressive", "residual", "decode"}


def test_modular_pipeline_from_a_saved_folder_gives_the_pipeline_image(pipes, tmp_path):
    """The Modular Diffusers round trip: save the pipeline (components + modular_model_index.json) and its blocks
    (custom code), then ModularPipeline.from_pretrained + load_components draws the same image."""
    from diffusers import ModularPipeline

    pipe, modular = pipes
    folder = str(tmp_path / "modular")
    modular.save_pretrained(folder, overwrite_modular_index=True)
    modular.blocks.save_pretrained(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        ModularPipeline.from_pretrained(folder, trust_remote_code=False)
    loaded = ModularPipeline.from_pretrained(folder, trust_remote_code=True)
    loaded.load_components()
    assert loaded.scheduler.config.guidance_scale == pipe.scheduler.config.guidance_scale  # saved, not defaulted
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    image = loaded(prompt=PROMPTS[0], output_type="np", output="images", **kwargs)
    expected = pipe(PROMPTS[0], output_type="np", **{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    np.testing.assert_array_equal(image, expected)


NO_PACKAGE_BLOCKS_SCRIPT = WITHOUT_PACKAGE_PRELUDE + """
import numpy as np
import torch
from diffusers import DiffusionPipeline, ModularPipelineBlocks

blocks = ModularPipelineBlocks.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(blocks).__name__ == "HARTBlocks" and type(blocks).__module__.startswith("hart_bundle_"), type(blocks)
hart = DiffusionPipeline.from_pretrained(sys.argv[2], trust_remote_code=True)
modular = blocks.init_pipeline()
modular.update_components(**hart.components)
modular.register_to_config(use_system_prompt=hart.config.use_system_prompt)
image = modular(prompt=sys.argv[3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np", output="images")
np.save(sys.argv[4], image)
"""


def test_blocks_load_as_hub_custom_blocks_without_the_package(pipes, tmp_path):
    """HARTBlocks.save_pretrained writes Hub custom blocks (modular_config.json + modular_hart.py): they load
    with trust_remote_code in an interpreter that cannot import hart_pipeline, offline, and draw the same image."""
    import json
    import os
    import subprocess
    import sys

    pipe, _ = pipes
    blocks_dir, pipe_dir, out = tmp_path / "blocks", tmp_path / "pipe", tmp_path / "image.npy"
    HARTBlocks().save_pretrained(str(blocks_dir))
    with open(blocks_dir / "modular_config.json") as f:
        assert json.load(f)["auto_map"] == {"ModularPipelineBlocks": "modular_hart.HARTBlocks"}
    pipe.save_pretrained(str(pipe_dir))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same reduction order as this process (exact equality)
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_BLOCKS_SCRIPT, str(blocks_dir), str(pipe_dir), PROMPTS[0],
                             str(out)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = pipe(PROMPTS[0], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(np.load(out), expected)
