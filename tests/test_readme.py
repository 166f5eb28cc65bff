"""The README's Python snippets run as written (built-in model, offline) and do what their text says."""

import os
import re

import numpy as np
import pytest
import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_block(heading: str) -> str:
    """The first ```python block after the README heading ``heading``."""
    text = open(README).read()
    start = text.index(f"\n{heading}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The namespace after the README's first Python snippet (it loads the built-in model as ``pipe``)."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("readme"))  # it writes circle.png
    try:
        namespace = {}
        exec(readme_block("## Python"), namespace)
        assert os.path.exists("circle.png")
    finally:
        os.chdir(cwd)
    namespace["pipe"].set_progress_bar_config(disable=True)
    return namespace


def pipeline_image(pipe) -> np.ndarray:
    return pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_stages_snippet_gives_the_pipeline_image(session):
    namespace = dict(session)
    exec(readme_block("### The stages, separately"), namespace)
    images, image_tokens = namespace["images"], namespace["image_tokens"]
    assert images.shape == (1, 3, 64, 64)
    expected = pipeline_image(namespace["pipe"])
    assert np.abs(images[0].permute(1, 2, 0).numpy() - expected).max() < 1e-5
    assert [t.shape[1] for t in image_tokens.indices] == [pn * pn for pn in namespace["pipe"].transformer.config.patch_nums]


def test_modular_snippet_gives_the_pipeline_image(session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves hart-modular/
    namespace = dict(session)
    exec(readme_block("### Modular Diffusers"), namespace)
    expected = (pipeline_image(namespace["pipe"]) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(namespace["image"]), expected)
    loaded = namespace["loaded"]
    loaded.set_progress_bar_config(disable=True)
    image = loaded(prompt="a red circle above a blue square", generator=torch.Generator().manual_seed(0),
                   output="images")[0]
    assert np.array_equal(np.asarray(image), expected)
