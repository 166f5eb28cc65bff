"""The shipped built-in model: it loads from the package alone, generates offline, and follows its prompts.

A fast check, not the full evaluation (that is ``examples/eval/evaluate.py``, figures in the model card):
the first held-out prompts of each layout (never seen in training), one sampling seed, guidance 4.5, read by
the independent adherence checker of ``examples/eval/adherence.py``.
"""

import os
import socket
import sys

import numpy as np
import pytest
import torch

from hart_pipeline.default_model import DEFAULT_MODEL_DIR, load_default_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "eval"))
import adherence  # noqa: E402
import heldout  # noqa: E402

SHIPPED_LIMIT_MB = 50


def _no_network(*args, **kwargs):
    raise AssertionError("the built-in model must load and run without network access")


@pytest.fixture(scope="module")
def default_pipe():
    with pytest.MonkeyPatch.context() as mp:  # any connection attempt while loading fails the tests
        mp.setattr(socket.socket, "connect", _no_network)
        pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _held_out_prompts(layout: str, n: int):
    """The first ``n`` held-out prompts of one layout (single / relation / count)."""
    prompts = heldout.load_heldout(check=False)["prompts"]  # test_eval checks the set against the training streams
    return [e["prompt"] for e in prompts if e["layout"] == layout][:n]


def test_shipped_weights_are_small_safetensors():
    files = [os.path.join(root, f) for root, _, names in os.walk(DEFAULT_MODEL_DIR) for f in names]
    weights = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".safetensors"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    assert sum(os.path.getsize(f) for f in files) / 2 ** 20 <= SHIPPED_LIMIT_MB


def test_generates_offline_at_native_size(default_pipe, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    image = default_pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0),
                         output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert image.std() > 0.05  # a scene, not a flat colour


@pytest.mark.parametrize("layout, criteria, max_missed", [
    ("single", ("colour", "position", "count"), 1),  # held-out rates: colour 0.97, position 0.99, count 1.00
    ("count", ("count",), 2),  # 0.85: three objects sometimes touch or two are drawn
    ("relation", ("count",), 1),  # two objects: 1.00
    pytest.param("relation", ("both_colours", "relation"), 1, marks=pytest.mark.xfail(
        strict=True, reason="issue 11, open: two-object colour binding (both colours 0.76, relation 0.39 on the "
                            "held-out prompts, model card); passes once a retrained model binds colours")),
])
def test_follows_held_out_prompts(default_pipe, layout, criteria, max_missed):
    """The first 6 held-out prompts of a layout, seed 0: at most ``max_missed`` miss one of ``criteria``.

    The shape is not asked: the 64 px model draws shapes softly (model card: shape 0.72).
    """
    prompts = _held_out_prompts(layout, 6)
    images = default_pipe(prompts, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
    rows = [adherence.score_image((im * 255).round().astype(np.uint8), p) for im, p in zip(images, prompts)]
    missed = [(p, [c for c in criteria if row[c] == 0.0]) for p, row in zip(prompts, rows)]
    missed = [m for m in missed if m[1]]
    assert len(missed) <= max_missed, missed


README_PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def readme_main_job_image(tmp_path_factory):
    """What the README's main job (``hart generate PROMPT --out image.png``, default seed) writes, run offline."""
    from PIL import Image

    from hart_pipeline.cli import main

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert f'hart generate "{README_PROMPT}" --out image.png' in readme
    out = tmp_path_factory.mktemp("main_job") / "image.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        main(["generate", README_PROMPT, "--out", str(out)])
    return np.asarray(Image.open(out).convert("RGB"))


def test_readme_main_job_draws_two_objects_one_above_the_other(readme_main_job_image):
    found = adherence.find_objects(readme_main_job_image)
    assert readme_main_job_image.shape == (64, 64, 3) and len(found) == 2, found
    top, bottom = sorted(found, key=lambda o: o.centre[1])
    assert bottom.centre[1] - top.centre[1] > abs(bottom.centre[0] - top.centre[0])  # stacked vertically, as asked


@pytest.mark.xfail(strict=True, reason="issue 11, open: the model binds colours to places only weakly (order probe "
                                       "64%); for this prompt 12 of 24 seeds draw red above blue, seed 0 a blue square "
                                       "above a red one (model card); passes once a retrained model binds colours")
def test_readme_main_job_draws_its_prompt(readme_main_job_image):
    """Red above blue: the colours and their arrangement as the prompt asks."""
    scores = adherence.score_image(readme_main_job_image, README_PROMPT)
    assert (scores["both_colours"], scores["relation"], scores["count"]) == (1.0, 1.0, 1.0), scores
