"""HARTPipeline with tiny random components (as diffusers' own pipeline tests do)."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hart_pipeline import HARTPipeline, HARTResidualScheduler, HARTTokens
from hart_pipeline.sampling import guidance_ramp
from hart_pipeline.convert import convert

from conftest import FIXTURES, tiny_pipeline

PROMPT = "a red circle above a blue square"


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipe, output_type):
    images = run(pipe, output_type=output_type, num_inference_steps=2)
    if output_type == "pil":
        assert isinstance(images[0], PIL.Image.Image) and images[0].size == (64, 64)
    elif output_type == "np":
        assert images.shape == (1, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (1, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    else:
        assert isinstance(images, HARTTokens)
        assert [tuple(i.shape) for i in images.indices] == [(1, 1), (1, 4), (1, 9), (1, 16)]
        assert images.latent.shape == images.residual.shape == (1, 16, 4, 4)


def test_other_schedules_and_sizes():
    from diffusers.utils import logging
    from diffusers.utils.testing_utils import CaptureLogger

    pipe = tiny_pipeline(patch_nums=(1, 2, 3, 4, 5, 6, 7, 8))
    pipe.set_progress_bar_config(disable=True)
    logger = logging.get_logger("hart_pipeline.pipeline_hart")
    with CaptureLogger(logger) as own:
        assert run(pipe, output_type="pt", num_inference_steps=2).shape == (1, 3, 128, 128)  # the model's own
    assert pipe.default_size == 128 and own.out == ""
    with CaptureLogger(logger) as other:  # the VAR-256 schedule: allowed, with a warning (once) that says so
        tokens = run(pipe, output_type="latent", height=256, width=256, num_inference_steps=2)
        run(pipe, output_type="latent", height=256, width=256, num_inference_steps=2)
    assert other.out.count("trained at 128x128") == 1 and "fragments" in other.out
    assert [i.shape[1] for i in tokens.indices] == [pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert sorted(pipe.supported_sizes) == [128, 256, 512, 1024]


def test_batch_and_images_per_prompt(pipe):
    images = run(pipe, prompt=[PROMPT, "two green triangle"], num_images_per_prompt=2, output_type="pt",
                 num_inference_steps=2, negative_prompt="blue")
    assert images.shape == (4, 3, 64, 64)
    assert not torch.equal(images[0], images[2])


def test_seeds(pipe):
    a, b = run(pipe, seed=3, output_type="np"), run(pipe, seed=3, output_type="np")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, run(pipe, seed=4, output_type="np"))


def test_negative_prompt_changes_the_image(pipe):
    assert not np.array_equal(run(pipe, output_type="np"), run(pipe, output_type="np", negative_prompt="green"))


def test_prompt_embeds_skip_the_text_encoder(pipe):
    embeds, positions, _, _ = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    mask = (positions >= 0).long()
    mask[:, 1:] = (positions[:, 1:] != positions[:, :-1]).long()
    pipe_no_text = HARTPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                                residual_head=pipe.residual_head, scheduler=pipe.scheduler)
    pipe_no_text.set_progress_bar_config(disable=True)
    a = run(pipe, output_type="np")
    b = run(pipe_no_text, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, output_type="np")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="no text encoder"):
        run(pipe_no_text, output_type="np")


def test_system_prompt_is_used_by_default(pipe):
    plain = HARTPipeline(**pipe.components, use_system_prompt=False)
    e1, p1, _, _ = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    e2, p2, _, _ = plain.encode_prompt(PROMPT, device=torch.device("cpu"))
    assert e1.shape == e2.shape == (1, 8, 32) and torch.equal(p1, p2)
    assert not torch.allclose(e1, e2)  # the prompt tokens attend to the system prompt first


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = HARTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(pipe, output_type="np"), run(loaded, output_type="np"))


def test_residual_guidance_scale_argument_then_scheduler_then_official(pipe):
    """The residual stage's guidance: the call's ``residual_guidance_scale``, else the scheduler's configured
    ``guidance_scale`` (a model's default), else the AR stage's final-scale guidance (official)."""
    official = run(pipe, output_type="latent")
    assert official.residual_guidance == guidance_ramp(4.5, len(official.indices))[-1] > 0
    unguided = run(pipe, output_type="latent", residual_guidance_scale=0.0)
    assert unguided.residual_guidance == 0.0
    assert torch.equal(unguided.latent, official.latent)  # the AR stage is untouched
    assert not torch.allclose(unguided.residual, official.residual)

    configured = HARTPipeline(**{**pipe.components, "scheduler": HARTResidualScheduler.from_config(
        pipe.scheduler.config, guidance_scale=0.0)}, use_system_prompt=pipe.config.use_system_prompt)
    configured.set_progress_bar_config(disable=True)
    assert torch.equal(run(configured, output_type="latent").residual, unguided.residual)
    assert torch.equal(run(configured, output_type="latent", residual_guidance_scale=official.residual_guidance).residual,
                       official.residual)  # the call's value wins over the scheduler's
    with pytest.raises(ValueError, match="residual_guidance_scale"):
        run(pipe, residual_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="HARTResidualScheduler config: `guidance_scale`"):
        HARTResidualScheduler(guidance_scale=float("nan"))


def test_scheduler_guidance_survives_save_and_load(pipe, tmp_path):
    configured = HARTPipeline(**{**pipe.components, "scheduler": HARTResidualScheduler(guidance_scale=0.0)})
    configured.save_pretrained(tmp_path)
    assert HARTPipeline.from_pretrained(tmp_path).scheduler.config.guidance_scale == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "empty list"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "one negative prompt per prompt"),
        (dict(height=100, width=100), r"64x64, 256x256, 512x512, 1024x1024"),
        (dict(height=256, width=512), "square"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 8, 31)), r"\(batch, tokens, 32\)"),
        (dict(prompt=None), "exactly one of"),
        (dict(top_p=1.5), "top_p"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "must be one torch.Generator"),
    ],
)
def test_bad_input_errors(pipe, kwargs, match):
    kwargs.setdefault("prompt", PROMPT)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_not_a_hart_folder(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        HARTPipeline.from_pretrained(tmp_path)
    (tmp_path / "llm").mkdir()
    with pytest.raises(ValueError, match="hart convert"):
        HARTPipeline.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("converted"))
    convert(os.path.join(FIXTURES, "parity", "tiny4", "official"), dst)
    return dst


def test_converted_folder_is_a_pipeline_with_a_valid_model_card(converted):
    with open(os.path.join(converted, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == ["pipeline_hart", "HARTPipeline"] and index["text_encoder"] == [None, None]
    assert os.path.isfile(os.path.join(converted, "pipeline_hart.py"))  # the code travels (remote_code.py)
    with open(os.path.join(converted, "README.md")) as f:
        text = f.read()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image" and meta["license"]
    assert "HARTPipeline.from_pretrained" in text


@pytest.mark.parametrize("mode", ["plain", "smooth"])
def test_pipeline_reproduces_official_tokens(converted, mode):
    """The official context + seed: the pipeline draws the official tokens at every scale."""
    e = load_file(os.path.join(FIXTURES, "parity", "tiny4", "expected.safetensors"))
    pipe = HARTPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=e["ctx"], prompt_attention_mask=e["ctx_mask"].long(), smooth=mode == "smooth",
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    for si, idx in enumerate(out.indices):
        assert torch.equal(idx, e[f"sample.{mode}.idx.{si}"]), f"scale {si}"
    # the residual noise comes from the same generator here (the official code uses torch's global RNG),
    # so the image differs from the official one only by the residual: same statistics
    image = pipe.vae.decode_latent(out.latent + out.residual) * 0.5 + 0.5
    official = e[f"sample.{mode}.image"]
    assert abs(image.mean() - official.mean()) < 0.02 and abs(image.std() - official.std()) < 0.02


def test_cli_generate_writes_png(pipe, tmp_path):
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    out = tmp_path / "image.png"
    cmd = [sys.executable, "-m", "hart_pipeline.cli", "generate", PROMPT, "--model", str(model), "--out", str(out),
           "--steps", "2", "--seed", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    assert PIL.Image.open(out).size == (64, 64)
    official = np.asarray(PIL.Image.open(out))
    subprocess.run(cmd + ["--residual-cfg", "0"], check=True, capture_output=True)
    unguided = np.asarray(PIL.Image.open(out))
    # --residual-cfg overrides the model's default, which is the scheduler's guidance_scale when the model sets one
    HARTPipeline(**{**pipe.components, "scheduler": HARTResidualScheduler(guidance_scale=0.0)}).save_pretrained(
        tmp_path / "model0")
    subprocess.run([str(tmp_path / "model0") if a == str(model) else a for a in cmd], check=True, capture_output=True)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), unguided) and not np.array_equal(unguided, official)
    bad = subprocess.run(cmd[:-4] + ["--size", "100"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


def test_push_to_hub_uploads_components_index_and_card(pipe, monkeypatch):
    """Hub calls are intercepted (no network in tests): what would be uploaded is checked."""
    import hart_pipeline.pipeline_hart as module

    uploaded = {}

    def fake_upload(self, folder, repo_id, **kwargs):
        uploaded[repo_id] = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
        with open(os.path.join(folder, "README.md")) as f:
            uploaded["card"] = f.read()

    monkeypatch.setattr(module, "create_repo", lambda repo_id, **kw: _Repo("user/" + repo_id.split("/")[-1]))
    monkeypatch.setattr(HARTPipeline, "_upload_folder", fake_upload)
    pipe.push_to_hub("tiny-hart")
    files = uploaded["user/tiny-hart"]
    assert "model_index.json" in files and "README.md" in files and "pipeline_hart.py" in files
    assert "transformer/modeling_hart.py" in files and "scheduler/scheduling_hart.py" in files
    for component in ("transformer", "residual_head", "vae"):
        assert f"{component}/diffusion_pytorch_model.safetensors" in files
    assert "user/tiny-hart" in uploaded["card"] and "library_name: diffusers" in uploaded["card"]


def test_model_classes_push_to_hub(pipe, monkeypatch):
    from diffusers.utils import hub_utils

    uploaded = []
    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **kw: hub_utils.ModelCard("---\nlibrary_name: diffusers\n---\n"))
    monkeypatch.setattr(hub_utils.PushToHubMixin, "_upload_folder",
                        lambda self, folder, repo_id, **kw: uploaded.append((repo_id, sorted(os.listdir(folder)))))
    for name in ("transformer", "residual_head", "vae"):
        getattr(pipe, name).push_to_hub(f"user/{name}")
    assert [u[0] for u in uploaded] == ["user/transformer", "user/residual_head", "user/vae"]
    assert all("diffusion_pytorch_model.safetensors" in files and "config.json" in files for _, files in uploaded)


def test_negative_prompt_string_with_prompt_embeds_batch(pipe):
    embeds, positions, _, _ = pipe.encode_prompt([PROMPT, "two green triangle"], device=torch.device("cpu"))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    images = run(pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt="blue",
                 output_type="pt", num_inference_steps=2)
    assert images.shape == (2, 3, 64, 64)
