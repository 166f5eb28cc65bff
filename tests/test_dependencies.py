"""One source of truth for the dependencies: ``requirements.txt`` (what ComfyUI-Manager installs for the pack)
is written from ``pyproject.toml``'s ``[project] dependencies``; this test fails when they drift.

Regenerate it with ``python tests/test_dependencies.py --write``.
"""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
HEADER = ("# For ComfyUI-Manager (pip install -r requirements.txt): written from pyproject.toml's [project]\n"
          "# dependencies by `python tests/test_dependencies.py --write`; do not edit by hand.\n")


def project_dependencies() -> list:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def requirements_text() -> str:
    return HEADER + "".join(f"{dep}\n" for dep in project_dependencies())


def test_requirements_txt_is_written_from_pyproject():
    with open(REQUIREMENTS) as f:
        assert f.read() == requirements_text(), "requirements.txt drifted: run python tests/test_dependencies.py --write"


def test_comfy_registry_metadata_follows_the_registry_rules():
    """The fields the Comfy Registry reads (docs.comfy.org/registry/specifications), checked as it checks them."""
    import re

    from packaging.specifiers import SpecifierSet

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)
    project, comfy = config["project"], config["tool"]["comfy"]
    name = project["name"]  # the node id
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name), name
    assert not re.search(r"[._-]{2}", name) and not name.endswith(("-", "_", ".")), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "semantic version X.Y.Z"
    assert set(project["license"]) <= {"file", "text"} and len(project["license"]) == 1
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert project["description"] and project["requires-python"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"]
    icon = comfy["Icon"]
    assert icon.startswith("https://") and icon.endswith((".svg", ".png", ".jpg", ".jpeg", ".webp", ".gif"))
    local_icon = icon.split("/main/", 1)[-1]  # the icon the URL serves is the one in this repository
    assert os.path.isfile(os.path.join(ROOT, local_icon)), local_icon
    SpecifierSet(comfy["requires-comfyui"])  # a valid version specifier
    assert set(comfy) <= {"PublisherId", "DisplayName", "Icon", "Banner", "requires-comfyui", "includes", "web"}


def test_generation_without_peft_and_a_clear_error_for_a_lora(tmp_path):
    """PEFT is needed for LoRA only: with it hidden, the built-in model generates (pipeline and ComfyUI chain)
    and loading a LoRA names the package to install."""
    script = r'''
import importlib.abc, importlib.util, sys
class NoPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "peft" or name.startswith("peft."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoPeft())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "peft" else _find_spec(name, *a)
import torch
from hart_pipeline.default_model import load_default_pipeline
from comfy_nodes import nodes as N
assert "peft" not in sys.modules
pipe = load_default_pipeline()
pipe.set_progress_bar_config(disable=True)
image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images[0]
assert image.shape == (64, 64, 3)
(model,) = N.load_model(N.BUILTIN_MODEL, N.OWN_TEXT_ENCODER, "float32", "cpu", False)
(images,) = N.generate(model, "a red circle", "", 0, "auto", 2, 4.5, 1)
assert images.shape == (1, 64, 64, 3)
try:
    pipe.load_lora_weights({"transformer.blocks.0.attn.proj.lora_A.weight": torch.zeros(4, 192)})
except ImportError as e:
    assert "pip install 'peft>=0.15'" in str(e), e
    print("OK")
'''
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        with open(REQUIREMENTS, "w") as f:
            f.write(requirements_text())
    else:
        sys.exit("usage: python tests/test_dependencies.py --write")
