"""Property-based tests (hypothesis): any input gives a valid finite image or a clear ValueError from our code.

Three input spaces, each drawn from valid and invalid values per argument: pipeline arguments, ``hart
generate`` command lines, and mutated pipeline folders (config fields, model_index.json entries, weight
files). Bounded for CI (few examples, tiny components, derandomized). Every case is classified; the
counts are printed at the end of the module (``pytest -s tests/test_properties.py``) and each space must
have produced both outcomes.
"""

import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hart_pipeline
from hart_pipeline import HARTPipeline


PROMPT = "a red circle above a blue square"
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PACKAGE = os.path.dirname(hart_pipeline.__file__)
OUTCOMES = Counter()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(OUTCOMES.values())
    print(f"\nproperty cases: {total}")
    for key, count in sorted(OUTCOMES.items()):
        print(f"  {key[0]:<9} {key[1]:<40} {count}")
    for space in {key[0] for key in OUTCOMES}:
        classes = {key[1].split(":")[0] for key in OUTCOMES if key[0] == space}
        assert {"image", "error"} <= classes, f"{space}: the strategy explored only {classes}"


def _raised_by_us(error: BaseException) -> bool:
    """The innermost frame that raised is in hart_pipeline (not torch / diffusers / transformers)."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE)


def _classify_error(space: str, error: ValueError, names) -> None:
    message = str(error)
    assert _raised_by_us(error), f"{space}: ValueError from outside hart_pipeline: {message}"
    named = [n for n in names if n in message]
    assert named, f"{space}: the error names none of the arguments/files: {message}"
    OUTCOMES[(space, f"error: {named[0]}")] += 1


# ----------------------------------------------------------------------------------------------- pipeline
JUNK = st.sampled_from([None, "4", "", True, False, [], [1], {"a": 1}, float("nan"), float("inf"), -float("inf"),
                        torch.ones(2), np.array([1, 2]), object()])


def _ints(valid):
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid).map(np.int64),
                     st.sampled_from(valid).map(torch.tensor), st.integers(-3, 3), st.integers(1001, 2**70), JUNK)


def _floats(valid_low, valid_high):
    return st.one_of(st.floats(valid_low, valid_high), st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(valid_low, valid_high).map(np.float32), st.integers(-2, 5), JUNK)


ARGUMENTS = {
    "height": st.one_of(st.none(), _ints([64])),
    "num_inference_steps": _ints([2, 3]),
    "guidance_scale": _floats(0.0, 8.0),
    "top_k": st.one_of(st.none(), _ints([0, 5, 600])),
    "top_p": _floats(0.0, 0.99),
    "num_images_per_prompt": _ints([1, 2]),
    "smooth": st.one_of(st.booleans(), JUNK),
    "generator": st.one_of(st.none(), st.just("gen"), st.just(["gen"]), st.just(["gen", "gen"]), JUNK),
    "negative_prompt": st.one_of(st.none(), st.text(max_size=12), st.lists(st.text(max_size=5), max_size=3), JUNK),
    "max_sequence_length": st.one_of(st.none(), _ints([4, 8])),
    "output_type": st.sampled_from(["np", "pt", "latent", "pil", "jpeg", None]),
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=2), JUNK),
}


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_pipeline_arguments(pipe, data):
    names = data.draw(st.sets(st.sampled_from(sorted(ARGUMENTS)), max_size=4))
    kwargs = {name: data.draw(ARGUMENTS[name], label=name) for name in sorted(names)}
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    if kwargs.get("generator") == "gen" or kwargs.get("generator") == ["gen"]:
        kwargs["generator"] = torch.Generator().manual_seed(0) if kwargs["generator"] == "gen" else [torch.Generator()]
    elif kwargs.get("generator") == ["gen", "gen"]:
        kwargs["generator"] = [torch.Generator(), torch.Generator()]
    if "height" in kwargs:
        kwargs["width"] = kwargs["height"]
    try:
        images = pipe(**kwargs).images
    except ValueError as e:
        _classify_error("pipeline", e, [f"`{name}`" for name in list(ARGUMENTS) + ["width"]])
        return
    if kwargs["output_type"] == "latent":
        values = (images.latent + images.residual).numpy()
    elif kwargs["output_type"] == "pil":
        values = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])
    else:
        values = np.asarray(images)
    assert np.isfinite(values).all()
    if kwargs["output_type"] != "latent":
        assert values.min() >= 0 and values.max() <= 1
    OUTCOMES[("pipeline", "image")] += 1


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("cli") / "model"
    pipe.save_pretrained(folder)
    return folder


FLAGS = {
    "--size": st.sampled_from(["64", "0", "63", "-64", "2048", "sixty-four", "64.0"]),
    "--steps": st.sampled_from(["2", "3", "1", "0", "1001", "-2", "8.5", "x"]),
    "--seed": st.one_of(st.integers(0, 2**64 - 1).map(str), st.sampled_from(["-1", str(2**64), "1e3", ""])),
    "--cfg": st.one_of(st.floats(0, 10).map(repr), st.sampled_from(["nan", "inf", "-1", "-inf", "abc"])),
    "--num-images": st.sampled_from(["1", "2", "0", "-1", "1.5"]),
    "--device": st.sampled_from(["cpu", "meta", "gpu", "cuda:99", "", "cpu:0"]),
    "--dtype": st.sampled_from(["fp32", "float32", "bf17", "int8", ""]),  # no cast: the pipeline is shared
    "--out": st.sampled_from(["{tmp}/x.png", "{tmp}/x.jpg", "{tmp}", "{tmp}/x", "{tmp}/x.xyz", "{tmp}/nope/x.png", "."]),
}


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_cli_arguments(model_folder, tmp_path, monkeypatch, capsys, data, pipe):
    from hart_pipeline.cli import main

    monkeypatch.setattr(HARTPipeline, "from_pretrained", classmethod(lambda cls, *a, **kw: pipe))  # no disk load
    chosen = data.draw(st.sets(st.sampled_from(sorted(FLAGS)), max_size=3))
    argv = ["generate", PROMPT, "--model", str(model_folder), "--steps", "2"]
    out = str(tmp_path / "image.png")
    for flag in sorted(chosen):
        value = data.draw(FLAGS[flag], label=flag).format(tmp=tmp_path)
        if flag == "--out":
            out = value
        argv += [flag, value]
    if "--out" not in chosen:
        argv += ["--out", out]
    try:
        main(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        flags = [f for f in list(FLAGS) + ["--model"] if f"argument {f}" in line]
        assert flags, f"CLI error names no flag: {line}"
        OUTCOMES[("cli", f"error: {flags[0]}")] += 1
        return
    written = capsys.readouterr().out.split()
    assert written and all(os.path.isfile(p) for p in written)
    from PIL import Image

    for path in written:
        assert np.isfinite(np.asarray(Image.open(path), dtype=np.float32)).all()
        os.remove(path)
    OUTCOMES[("cli", "image")] += 1


# ----------------------------------------------------------------------------------------------- folders
CONFIG_FIELDS = {
    "transformer": ["latent_channels", "vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_ratio", "norm_eps",
                    "context_tokens", "context_dim", "patch_nums", "rope_theta"],
    "vae": ["latent_channels", "vocab_size", "base_channels", "channel_multipliers", "num_res_blocks", "quant_resi",
            "num_phi", "patch_nums"],
    "residual_head": ["latent_channels", "condition_dim", "width", "num_layers", "residual_scale"],
    "scheduler": ["num_train_timesteps", "clip_sample"],
}
VALUES = st.sampled_from([None, -1, 0, 1, 2, 3, 8, 16, 2.5, 1e9, 2**40, "abc", "", True, [], [1], [1, 2], [3, 2, 1],
                          [1, 2, 3, 4], {"a": 1}, float("nan"), 0.5, 1e-6])
WEIGHTED = ["transformer", "vae", "residual_head"]


def _mutate_config(folder, data):
    component = data.draw(st.sampled_from(sorted(CONFIG_FIELDS)), label="component")
    path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    config = json.loads(path.read_text())
    field = data.draw(st.sampled_from(CONFIG_FIELDS[component]), label="field")
    if data.draw(st.booleans(), label="delete"):
        config.pop(field)
    else:
        config[field] = data.draw(VALUES, label="value")
    path.write_text(json.dumps(config))


def _mutate_index(folder, data):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    key = data.draw(st.sampled_from(["transformer", "vae", "residual_head", "scheduler", "tokenizer", "text_encoder",
                                     "use_system_prompt", "_class_name"]))
    index[key] = data.draw(st.sampled_from([None, "x", ["diffusers", "DDPMScheduler"], ["hart_pipeline", "HARTTransformer"],
                                            ["hart_pipeline.models.residual_head", "HARTResidualHead"], 1, [], "yes"]))
    path.write_text(data.draw(st.sampled_from([json.dumps(index), json.dumps([index]), json.dumps(index)[:-3]])))


def _mutate_weights(folder, data):
    component = data.draw(st.sampled_from(WEIGHTED), label="component")
    path = folder / component / "diffusion_pytorch_model.safetensors"
    how = data.draw(st.sampled_from(["drop", "extra", "dtype", "nan", "scale", "truncate", "flip", "swap"]), label="how")
    if how in ("truncate", "flip"):
        raw = bytearray(path.read_bytes())
        if how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            position = data.draw(st.integers(0, len(raw) - 1), label="position") if raw else 0
            if raw:
                raw[position] ^= data.draw(st.integers(1, 255), label="mask")
        path.write_bytes(bytes(raw))
        return
    if how == "swap":
        other = data.draw(st.sampled_from([c for c in WEIGHTED if c != component]), label="other")
        shutil.copy(folder / other / path.name, path)
        return
    state = load_file(path)
    key = data.draw(st.sampled_from(sorted(state)), label="key")
    if how == "drop":
        del state[key]
    elif how == "extra":
        state["extra.weight"] = torch.zeros(3)
    elif how == "dtype":
        state[key] = state[key].to(data.draw(st.sampled_from([torch.int32, torch.bool, torch.int8, torch.float16])))
    elif how == "nan":
        state[key] = state[key].clone().fill_(data.draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    else:
        state[key] = state[key] * data.draw(st.sampled_from([0.0, -1.0, 10.0, 1e30]), label="factor")
    save_file(state, path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("pristine") / "pipe"
    pipe.save_pretrained(folder)
    return folder


@settings(max_examples=35, **SETTINGS)
@given(data=st.data())
def test_mutated_folders(pristine, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("mutated") / "pipe"
    shutil.copytree(pristine, folder)
    mutate = data.draw(st.sampled_from([_mutate_config, _mutate_index, _mutate_weights]), label="mutation")
    mutate(folder, data)
    names = [f"`{f}`" for fields in CONFIG_FIELDS.values() for f in fields] + [
        "model_index.json", "transformer", "vae", "residual_head", "scheduler", "HARTTransformer", "HARTHybridTokenizer",
        "HARTResidualHead", "HARTResidualScheduler", "`use_system_prompt`", "images", "latents", "tokenizer", "text_encoder"]
    try:
        loaded = HARTPipeline.from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
        images = loaded(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    except ValueError as e:
        _classify_error("folders", e, names)
        return
    finally:
        shutil.rmtree(folder)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    OUTCOMES[("folders", "image")] += 1
