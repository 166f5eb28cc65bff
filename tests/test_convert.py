"""The official-layout -> diffusers converter: CLI, EMA choice, and clear errors for unsupported input."""

import json
import re
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hart_pipeline import HARTHybridTokenizer, HARTResidualHead, HARTResidualScheduler, HARTTransformer
from hart_pipeline.convert import (
    CheckpointError,
    convert_official,
    load_state_dict,
    main,
    map_official_tokenizer_state,
    split_official_transformer_state,
)

from conftest import FIXTURES

OFFICIAL = os.path.join(FIXTURES, "parity", "tiny4", "official")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("transformer", "residual_head", "vae", "scheduler")


def _official_llm(name: str):
    raw = torch.load(os.path.join(OFFICIAL, "llm", name), map_location="cpu", weights_only=True)
    return split_official_transformer_state(raw)


@pytest.fixture
def official(tmp_path):
    """A private, mutable copy of the tiny4 official checkpoint."""
    dst = tmp_path / "official"
    shutil.copytree(OFFICIAL, dst)
    return dst


def _edit_json(path, **changes):
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _edit_bin(path, edit):
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, path)


def _assert_diffusers_layout(dst):
    for name in COMPONENTS:
        folder = os.path.join(dst, name)
        files = os.listdir(folder)
        assert any(f.endswith(".json") for f in files), (name, files)
        if name != "scheduler":
            assert "config.json" in files
            assert any(f.endswith(".safetensors") for f in files), (name, files)
            assert not any(f.endswith(".bin") for f in files), (name, files)


# ----------------------------------------------------------------------------- CLI
def test_cli_converts(tmp_path):
    """`python -m hart_pipeline.convert SRC DST` in a real subprocess (default: the EMA weights).

    One subprocess only (importing diffusers takes seconds); the error exit of the same ``main`` is
    checked in-process by test_main_bad_folder_exits_2.
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dst = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "hart_pipeline.convert", OFFICIAL, str(dst)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Converted" in result.stdout
    _assert_diffusers_layout(dst)
    trunk, head = _official_llm("ema_model.bin")
    for name, state in (("transformer", trunk), ("residual_head", head)):
        saved = load_file(os.path.join(dst, name, "diffusion_pytorch_model.safetensors"))
        assert saved.keys() == state.keys()
        assert all(torch.equal(saved[k], state[k]) for k in state), name


def test_main_no_ema_loads_pytorch_model_bin(tmp_path):
    main([OFFICIAL, str(tmp_path / "out"), "--no-ema"])
    _assert_diffusers_layout(tmp_path / "out")
    transformer = HARTTransformer.from_pretrained(tmp_path / "out" / "transformer")
    head = HARTResidualHead.from_pretrained(tmp_path / "out" / "residual_head")
    HARTResidualScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    trunk, head_state = _official_llm("pytorch_model.bin")
    ema_trunk, ema_head = _official_llm("ema_model.bin")
    for model, state, ema in ((transformer, trunk, ema_trunk), (head, head_state, ema_head)):
        ours = model.state_dict()
        assert ours.keys() == state.keys()
        assert all(torch.equal(ours[k], state[k]) for k in state)
        # the fixture's non-EMA file is the EMA one + 0.01 * randn on every parameter
        diff = max((ours[k] - ema[k]).abs().max().item() for k in state)
        assert 1e-3 < diff < 0.1


def test_main_bad_folder_exits_2(tmp_path, capsys):
    (tmp_path / "not_hart").mkdir()
    (tmp_path / "not_hart" / "readme.txt").write_text("hello")
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "not_hart"), str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not an official HART checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_llm_folder_as_source():
    components = convert_official(os.path.join(OFFICIAL, "llm"))
    ema_trunk, _ = _official_llm("ema_model.bin")
    ours = components.transformer.state_dict()
    assert all(torch.equal(ours[k], ema_trunk[k]) for k in ema_trunk)
    assert tuple(components.transformer.config.patch_nums) == (1, 2, 3, 4)
    assert tuple(components.vae.config.patch_nums) == (1, 2, 3, 4)
    assert components.vae.config.latent_channels == 16 and components.vae.config.vocab_size == 1024
    raw = torch.load(os.path.join(OFFICIAL, "tokenizer", "pytorch_model.bin"), map_location="cpu", weights_only=True)
    vae_state = components.vae.state_dict()
    assert torch.equal(vae_state["quantizer.embedding.weight"], raw["vae.quantize.embedding.weight"])
    assert torch.equal(vae_state["quantizer.phis.3.weight"], raw["vae.quantize.quant_resi.qresi_ls.3.weight"])


def test_tokenizer_key_mapping_drops_training_only_keys():
    raw = {"vae.quantize.ema_vocab_hit_SV": torch.zeros(4, 8), "disc.main.0.weight": torch.zeros(1),
           "vae.quantize.embedding.weight": torch.ones(8, 2), "vae.quantize.quant_resi.qresi_ls.2.bias": torch.ones(2),
           "vae.encoder.conv_in.weight": torch.ones(1)}
    assert set(map_official_tokenizer_state(raw)) == {"quantizer.embedding.weight", "quantizer.phis.2.bias",
                                                      "encoder.conv_in.weight"}


# ----------------------------------------------------------------------------- clear errors
def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not an official HART checkpoint"):
        convert_official(str(tmp_path))


def test_wrong_model_type(official):
    _edit_json(official / "llm" / "config.json", model_type="llama")
    with pytest.raises(CheckpointError, match=r"model_type 'llama'.*hart_transformer_t2i"):
        convert_official(str(official))


def test_wrong_tokenizer_model_type(official):
    _edit_json(official / "tokenizer" / "config.json", model_type="vqgan")
    with pytest.raises(CheckpointError, match="model_type 'vqgan'"):
        convert_official(str(official))


def test_unsupported_flag(official):
    _edit_json(official / "llm" / "config.json", attn_type="gpt2")
    with pytest.raises(CheckpointError, match=r"unsupported architecture flags \{'attn_type': 'gpt2'\}"):
        convert_official(str(official))


def test_missing_flag_uses_official_default(official):
    """An absent flag means the official class default (e.g. use_context_norm=False), which is unsupported."""
    with open(official / "llm" / "config.json") as f:
        config = json.load(f)
    del config["use_context_norm"]
    with open(official / "llm" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="use_context_norm"):
        convert_official(str(official))


def test_missing_key(official):
    _edit_bin(official / "llm" / "ema_model.bin", lambda s: s.pop("blocks.1.ffn.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.ffn\.up_proj\.weight") as info:
        convert_official(str(official))
    assert "transformer" in str(info.value) and "unexpected" not in str(info.value)


def test_missing_head_key(official):
    _edit_bin(official / "llm" / "ema_model.bin", lambda s: s.pop("diffloss.net.cond_embed.bias"))
    with pytest.raises(CheckpointError, match=r"residual head[\s\S]*missing: cond_embed\.bias"):
        convert_official(str(official))


def test_unexpected_key(official):
    _edit_bin(official / "llm" / "ema_model.bin", lambda s: s.__setitem__("blocks.0.attn.k_bias", torch.zeros(64)))
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.0\.attn\.k_bias"):
        convert_official(str(official))


def test_wrong_shape(official):
    _edit_bin(official / "llm" / "ema_model.bin", lambda s: s.__setitem__("word_embed.weight", torch.zeros(64, 17)))
    with pytest.raises(CheckpointError, match=r"word_embed\.weight: checkpoint \(64, 17\) vs model \(64, 16\)"):
        convert_official(str(official))


def test_tokenizer_wrong_shape(official):
    def edit(state):
        state["vae.quantize.embedding.weight"] = torch.zeros(512, 16)

    _edit_bin(official / "tokenizer" / "pytorch_model.bin", edit)
    with pytest.raises(CheckpointError, match=r"tokenizer[\s\S]*quantizer\.embedding\.weight: checkpoint \(512, 16\)"):
        convert_official(str(official))


def test_integer_weights_are_refused(official):
    """A weight that should be floating point but is int32 (a damaged or foreign file) is named, not cast silently."""
    def edit(state):
        state["vae.quantize.embedding.weight"] = state["vae.quantize.embedding.weight"].to(torch.int32)

    _edit_bin(official / "tokenizer" / "pytorch_model.bin", edit)
    with pytest.raises(CheckpointError, match=r"not floating point[\s\S]*quantizer\.embedding\.weight \(torch\.int32\)"):
        convert_official(str(official))


def test_var_quantizer_refused(official):
    _edit_json(official / "tokenizer" / "config.json", quantizer_type="var")
    with pytest.raises(CheckpointError, match="quantizer_type 'var'"):
        convert_official(str(official))


def test_missing_tokenizer_folder(official):
    shutil.rmtree(official / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        convert_official(str(official))


def test_missing_weights_file(official):
    os.remove(official / "llm" / "ema_model.bin")
    with pytest.raises(CheckpointError, match="ema_model.bin"):
        convert_official(str(official))
    convert_official(str(official), ema=False)  # the non-EMA file is still there


# ----------------------------------------------------------------------------- safe loading
EXECUTED = []


def _side_effect(tag):
    EXECUTED.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return (_side_effect, ("unpickled",))


def test_pickled_object_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(str(tmp_path), ["model.safetensors", "pytorch_model.bin"])
    assert EXECUTED == []


def test_safetensors_preferred_over_bin(tmp_path):
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    state = load_state_dict(str(tmp_path), ["model.safetensors", "pytorch_model.bin"])
    assert torch.equal(state["w"], torch.ones(3))
    os.remove(tmp_path / "model.safetensors")
    assert torch.equal(load_state_dict(str(tmp_path), ["model.safetensors", "pytorch_model.bin"])["w"], torch.zeros(3))


def test_converter_prefers_tokenizer_safetensors(official):
    raw = torch.load(official / "tokenizer" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raw = {k: v.clone() for k, v in raw.items()}
    raw["vae.quantize.embedding.weight"] *= 2
    save_file(raw, str(official / "tokenizer" / "model.safetensors"))
    vae = convert_official(str(official)).vae
    assert torch.equal(vae.quantizer.embedding.weight, raw["vae.quantize.embedding.weight"])
    assert isinstance(vae, HARTHybridTokenizer)


def _convert_main_error(official, dst, capsys):
    """Run the converter's command line; return its one-line error (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        main([str(official), str(dst)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("content, match", [
    ("{broken", r"llm/config.json is not valid JSON"),
    ("[1, 2, 3]", r"llm/config.json must hold a JSON object; got a list"),
])
def test_invalid_llm_config(official, tmp_path, capsys, content, match):
    (official / "llm" / "config.json").write_text(content)
    assert re.search(match, _convert_main_error(official, tmp_path / "out", capsys))


@pytest.mark.parametrize("folder, changes, match", [
    ("llm", {"model_type": []}, r"model_type \[\]"),
    ("llm", {"context_dim": 2.5}, r"llm/config.json \(official field `context_dim`\).*must be an integer"),
    ("llm", {"depth": "4"}, r"official field `depth`.*`num_layers` must be an integer"),
    ("llm", {"patch_nums": [1, 2, 2]}, r"`patch_nums` must be strictly increasing"),
    ("tokenizer", {"z_channels": "16"}, r"tokenizer/config.json \(official field `z_channels`\)"),
    ("tokenizer", {"ch_mult": -1}, r"official field `ch_mult`.*non-empty list"),
    ("tokenizer", {"share_quant_resi": "4"}, r"share_quant_resi>=2"),
    ("llm", {"vae_path": []}, r"vae_path must be a folder path or null.*got \[\]"),
    ("llm", {"vae_path": ""}, r"vae_path must be a folder path or null"),
    ("llm", {"attn_l2_norm": "yes"}, r"official field `attn_l2_norm`.*must be True or False"),
])
def test_wrong_config_types(official, tmp_path, capsys, folder, changes, match):
    _edit_json(official / folder / "config.json", **changes)
    assert re.search(match, _convert_main_error(official, tmp_path / "out", capsys))


@pytest.mark.parametrize("payload", [[torch.zeros(2)], torch.zeros(3), {"a": 1}, {1: torch.zeros(1)}])
def test_bin_that_is_not_a_state_dict(official, tmp_path, capsys, payload):
    torch.save(payload, official / "llm" / "ema_model.bin")
    err = _convert_main_error(official, tmp_path / "out", capsys)
    assert "ema_model.bin must hold a state dict (parameter name -> tensor)" in err


def test_corrupt_safetensors_beside_a_good_bin(official, tmp_path, capsys):
    (official / "tokenizer" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    err = _convert_main_error(official, tmp_path / "out", capsys)
    assert "tokenizer/model.safetensors is not a readable safetensors file" in err and "pytorch_model.bin" in err


def test_bad_destination(official, tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    assert "exists and is not a folder" in _convert_main_error(official, existing, capsys)
    assert "is a file, not a folder" in _convert_main_error(official, existing / "sub", capsys)
    assert existing.read_text() == "x"
