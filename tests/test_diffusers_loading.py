"""Generic diffusers loading: DiffusionPipeline.from_pretrained with and without this package, atomic saves."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import hart_pipeline
from hart_pipeline import HARTPipeline
from hart_pipeline.default_model import DEFAULT_MODEL_DIR

from conftest import WITHOUT_PACKAGE_PRELUDE

PROMPT = "a red circle above a blue square"

NO_PACKAGE_SCRIPT = WITHOUT_PACKAGE_PRELUDE + textwrap.dedent('''
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    try:
        import hart_pipeline  # noqa: F401
        raise SystemExit("hart_pipeline should not be importable here")
    except ImportError:
        pass
    try:
        DiffusionPipeline.from_pretrained(sys.argv[1])
        raise SystemExit("loading custom code without trust_remote_code should fail")
    except ValueError as e:
        assert "trust_remote_code" in str(e), e
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "HARTPipeline" and type(pipe).__module__.startswith("hart_bundle_")
    image = pipe("a red circle above a blue square", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    np.save(sys.argv[2], image)
''')


def run(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "hart"
    pipe.save_pretrained(folder)
    return folder


def test_saved_folder_carries_its_code(saved):
    with open(saved / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == ["pipeline_hart", "HARTPipeline"]
    assert index["transformer"] == ["modeling_hart", "HARTTransformer"]
    assert index["scheduler"] == ["scheduling_hart", "HARTResidualScheduler"]
    assert index["text_encoder"] == ["transformers", "Qwen2Model"]  # library components stay as they are
    bundle = (saved / "pipeline_hart.py").read_text()
    for component, file in (("vae", "modeling_hart"), ("transformer", "modeling_hart"), ("scheduler", "scheduling_hart")):
        assert (saved / component / f"{file}.py").read_text() == bundle


def test_diffusion_pipeline_with_the_package_installed(pipe, saved):
    loaded = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(loaded), run(pipe))
    # HARTPipeline itself reads the same folder with the installed code (no remote code)
    installed = HARTPipeline.from_pretrained(saved)
    assert type(installed.transformer) is hart_pipeline.HARTTransformer
    assert np.array_equal(run(installed), run(pipe))


def test_diffusion_pipeline_resolves_string_indices_after_import():
    """Folders whose index names "HARTPipeline" (the built-in model) load through DiffusionPipeline too."""
    with open(DEFAULT_MODEL_DIR / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "HARTPipeline"
    loaded = DiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR)
    assert type(loaded) is HARTPipeline


@pytest.mark.parametrize("first", ["hart_pipeline", "diffusers"])
def test_string_indices_resolve_whichever_package_is_imported_first(first):
    """``import hart_pipeline`` imports no diffusers (lazy names); the names still reach diffusers' namespace,
    whether diffusers is imported before or after it."""
    second = "diffusers" if first == "hart_pipeline" else "hart_pipeline"
    code = (f"import sys, {first}; lazy = 'diffusers' not in sys.modules or '{first}' == 'diffusers'; import {second}; "
            "import diffusers, hart_pipeline; from diffusers import DiffusionPipeline; "
            "from hart_pipeline.default_model import DEFAULT_MODEL_DIR; "
            "pipe = DiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, text_encoder=None, tokenizer=None); "
            "print(lazy, type(pipe) is hart_pipeline.HARTPipeline, diffusers.HARTInpaintPipeline is "
            "hart_pipeline.HARTInpaintPipeline)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "True", "True"]


def test_trust_remote_code_without_the_package(pipe, saved, tmp_path):
    out = tmp_path / "image.npy"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same reduction order as this process (exact equality)
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, str(saved), str(out)], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(out), run(pipe))


def test_a_remote_code_pipeline_saves_the_same_code(saved, tmp_path):
    loaded = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "pipeline_hart.py").read_text() == (saved / "pipeline_hart.py").read_text()
    with open(tmp_path / "again" / "model_index.json") as f, open(saved / "model_index.json") as g:
        again, first = json.load(f), json.load(g)
    assert {k: v for k, v in again.items() if k != "_name_or_path"} == {k: v for k, v in first.items() if k != "_name_or_path"}


INTERRUPTED_SAVE = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    for p in pipe.transformer.parameters():
        p.data.add_(1.0)  # a different model
    original = type(pipe.residual_head).save_pretrained

    def killed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        os._exit(9)  # the process dies after writing some components

    type(pipe.residual_head).save_pretrained = killed
    pipe.save_pretrained(sys.argv[1])
''')


def test_interrupted_save_leaves_the_previous_folder(pipe, tmp_path):
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    tests = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_SAVE, str(folder), tests], capture_output=True)
    assert result.returncode == 9
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    loaded = HARTPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(loaded), run(pipe))


def test_failed_save_cleans_up_and_keeps_the_old_folder(pipe, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    (folder / "README.md").write_text("my card")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(pipe.vae), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging folder left behind
    monkeypatch.undo()
    pipe.save_pretrained(folder)  # a successful save keeps the user's model card
    assert (folder / "README.md").read_text() == "my card"


def test_save_keeps_files_beside_the_pipeline_and_replaces_its_components(pipe, tmp_path):
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    (folder / "checkpoints" / "step_2").mkdir(parents=True)
    (folder / "checkpoints" / "step_2" / "checkpoint.json").write_text('{"step": 2}')
    (folder / "train_log.jsonl").write_text("{}\n")
    stale = folder / "text_encoder"  # a component the previous pipeline had and the new one lacks
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "BertModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    stale.mkdir(exist_ok=True)
    (stale / "config.json").write_text("{}")
    no_text = HARTPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})
    no_text.save_pretrained(folder)
    assert (folder / "checkpoints" / "step_2" / "checkpoint.json").read_text() == '{"step": 2}'
    assert (folder / "train_log.jsonl").read_text() == "{}\n"
    assert not stale.exists()
    assert json.loads((folder / "model_index.json").read_text())["text_encoder"] == [None, None]
