"""The ``hart`` command: every argument is validated before a model loads, errors name the flag, help for all."""

import argparse

import pytest

import hart_pipeline.default_model as default_model
from hart_pipeline import HARTPipeline
from hart_pipeline.cli import build_parser, folder_limits, main


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model would be loaded: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(HARTPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(default_model, "load_default_pipeline", refuse)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


BAD = [
    (["--size", "63"], "argument --size: this model generates square images of side 64, 128, 256, 512; got 63"),
    (["--size", "0"], "argument --size"),
    (["--size", "1024"], "argument --size"),
    (["--out", "."], "argument --out: . is a folder"),
    (["--out", "img"], "argument --out: 'img' has no file extension"),
    (["--out", "img.xyz"], "argument --out: 'img.xyz' has the extension .xyz"),
    (["--out", "/nonexistent-folder/x.png"], "argument --out: the folder /nonexistent-folder does not exist"),
    (["--seed", "18446744073709551616"], "argument --seed: must be in [0, 2**64 - 1]"),
    (["--seed", "-1"], "argument --seed"),
    (["--steps", "1001"], "argument --steps: residual diffusion steps must be in [2, 1000]"),
    (["--steps", "1"], "argument --steps"),
    (["--cfg", "nan"], "argument --cfg: must be a finite number"),
    (["--cfg", "-1"], "argument --cfg"),
    (["--cfg", "inf"], "argument --cfg"),
    (["--residual-cfg", "-0.5"], "argument --residual-cfg: must be a finite number >= 0"),
    (["--residual-cfg", "nan"], "argument --residual-cfg"),
    (["--num-images", "0"], "argument --num-images"),
    (["--device", "meta"], "argument --device: the meta device holds no data"),
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--seed", "1.5"], "argument --seed: invalid int value"),
    (["--model", "/no/such/folder"], "argument --model: there is no folder /no/such/folder"),
    (["--model", "./my_model"], "argument --model: there is no folder ./my_model; give a HART pipeline folder"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_fail_before_loading(no_loading, capsys, argv, message):
    assert message in _error(capsys, ["generate", "a red circle"] + argv)


def test_cuda_on_a_cpu_only_torch(no_loading, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error of a CPU-only torch")
    assert "argument --device: 'cuda' is not available" in _error(capsys, ["generate", "x", "--device", "cuda"])


def test_sizes_are_read_from_the_model_folder(tmp_path):
    from conftest import tiny_pipeline

    assert folder_limits(None) == {"sizes": [64, 128, 256, 512], "max_steps": 1000}  # the built-in model
    tiny_pipeline().save_pretrained(tmp_path)
    assert folder_limits(str(tmp_path)) == {"sizes": [64, 256, 512, 1024], "max_steps": 1000}
    assert folder_limits("user/some-hub-repo")["sizes"] is None  # checked right after loading


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"hart {name}: {action.option_strings or action.dest} has no help text"


@pytest.mark.parametrize("flags, ema", [([], True), (["--ema"], True), (["--no-ema"], False), (["--no-ema", "--ema"], True)])
def test_convert_ema_flags(flags, ema):
    assert build_parser().parse_args(["convert", "src", "dst"] + flags).ema is ema


def test_blank_prompt_and_prompt_file_fail_before_loading(no_loading, capsys, tmp_path):
    assert "argument PROMPT: the prompt is empty" in _error(capsys, ["generate", "  "])
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n   \n")
    assert f"argument --prompts: {blank} holds no prompt" in _error(capsys, ["generate", "--prompts", str(blank)])
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "cannot read" in _error(capsys, ["generate", "--prompts", str(binary)])


def test_a_hub_id_that_cannot_load_names_the_flag_and_login(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("Cannot load model user/typo: not cached. Please check out the root cause in the stacktrace above.")

    monkeypatch.setattr(HARTPipeline, "from_pretrained", offline)
    err = _error(capsys, ["generate", "a red circle", "--model", "user/typo"])
    assert err.startswith("error: --model user/typo: no such folder here") and "hf auth login" in err
    assert "stacktrace" not in err


def test_parsing_imports_no_torch():
    """`hart --help`, a typo or a bad flag answer at once: the package and the parser import no torch / diffusers."""
    import subprocess
    import sys

    code = ("import sys; from hart_pipeline.cli import build_parser; "
            "build_parser().parse_args(['generate', 'x', '--size', '64']); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dtype_choices_are_the_validation_names():
    from hart_pipeline.cli import DTYPE_CHOICES
    from hart_pipeline.validation import DTYPE_NAMES

    assert sorted(DTYPE_CHOICES) == sorted(DTYPE_NAMES)


def test_no_import_noise_from_a_generate_run(tmp_path):
    """The test install has torchao, whose CUDA-only libraries fail to load on a CPU torch; `hart` says nothing of it."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hart_pipeline.cli", "generate", "a red circle", "--out",
                             str(tmp_path / "a.png")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    noise = [line for line in result.stderr.splitlines() if "torchao" in line or "register_constant" in line]
    assert noise == []


def test_a_model_folder_without_text_encoder_names_the_fix(no_loading, capsys, tmp_path):
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.register_modules(text_encoder=None, tokenizer=None)
    pipe.save_pretrained(tmp_path / "no_text")
    err = _error(capsys, ["generate", "a red circle", "--model", str(tmp_path / "no_text")])
    assert "has no text encoder" in err and "--text-encoder" in err
    (tmp_path / "empty").mkdir()
    assert "has no readable model_index.json" in _error(capsys, ["generate", "x", "--model", str(tmp_path / "empty")])


def test_int8_flag_checks_before_loading(no_loading, capsys, monkeypatch):
    import importlib.util

    import torch

    assert "leave --dtype out" in _error(capsys, ["generate", "x", "--int8", "--dtype", "bf16"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # (a CI CPU may have no int8 units)
    with pytest.raises(AssertionError, match="a model was loaded"):  # the CPU's int8 layers need no torchao
        main(["generate", "x", "--int8", "--device", "cpu"])


def test_int8_flag_refuses_a_cpu_without_int8_units(no_loading, capsys, monkeypatch):
    """On a CPU without VNNI / AMX (AVX2 only, as an AMD EPYC Milan core) int8 layers run no faster than float32
    (torchao's ~30x slower): --int8 says so before anything loads; with the units (or on CUDA) it goes on to load."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    err = _error(capsys, ["generate", "x", "--int8", "--device", "cpu"])
    assert "argument --int8: this CPU" in err and "VNNI / AMX" in err and "leave int8 out" in err
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    with pytest.raises(AssertionError, match="a model was loaded"):  # past the check: the load (refused here)
        main(["generate", "x", "--int8", "--device", "cpu"])
