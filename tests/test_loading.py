"""Strict loading: a mutated pipeline folder fails at load time naming the component, the file or the key.

Every case used to load with a warning (and give a NaN image) or fail only at generation / deep inside
torch. The component-level cases go through ``HARTTransformer.from_pretrained`` & co. directly, the path
every pipeline loader (``HARTPipeline``, ``DiffusionPipeline``) uses.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hart_pipeline import HARTHybridTokenizer, HARTPipeline, HARTResidualHead, HARTTransformer
from hart_pipeline.loading import ComponentLoadError

from conftest import tiny_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    return copy


def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    data = fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _edit_weights(path, fn):
    state = load_file(path)
    fn(state)
    save_file(state, path)


def _load(folder):
    return HARTPipeline.from_pretrained(folder)


def test_saved_folder_loads(folder):
    assert isinstance(_load(folder), HARTPipeline)


def _drop_first(state):
    del state[sorted(state)[0]]


def _flip_bytes(path):
    """Overwrite the high bytes of three float32 values with 0xFF: they decode to NaN."""
    data = bytearray(open(path, "rb").read())
    for position in (len(data) - 1, len(data) - 401, len(data) - 801):
        data[position - 1] |= 0x80
        data[position] = 0xFF if data[position] & 0x80 else 0x7F
    open(path, "wb").write(bytes(data))


WEIGHT_CASES = [
    ("vae", _drop_first, r"HARTHybridTokenizer \(.*vae\): the weights do not match the config \(missing: decoder"),
    ("residual_head", lambda s: s.update(extra=torch.zeros(2)), r"HARTResidualHead .*unexpected: extra"),
    ("transformer", lambda s: s.update({"head.bias": s["head.bias"].to(torch.int32)}),
     r"non-floating-point tensors: head.bias \(I32\)"),
    ("vae", lambda s: s.update({"quantizer.embedding.weight": s["quantizer.embedding.weight"] > 0}),
     r"quantizer.embedding.weight \(BOOL\)"),
    ("transformer", lambda s: s.update({"head.weight": s["head.weight"][:5]}), r"HARTTransformer .*head.weight"),
    ("residual_head", lambda s: s["final_layer.linear.bias"].fill_(float("inf")),
     r"HARTResidualHead .*final_layer.linear.bias contain NaN or infinite"),
]


@pytest.mark.parametrize("component, edit, match", WEIGHT_CASES, ids=[str(i) for i in range(len(WEIGHT_CASES))])
def test_bad_weights(folder, component, edit, match):
    _edit_weights(folder / component / WEIGHTS, edit)
    with pytest.raises(ComponentLoadError, match=match):
        _load(folder)


def test_flipped_bytes_are_caught(folder):
    _flip_bytes(folder / "vae" / WEIGHTS)
    with pytest.raises(ComponentLoadError, match=r"HARTHybridTokenizer .*contain NaN or infinite"):
        _load(folder)


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_truncated_weight_file_names_the_file(folder, component):
    files = [f for f in os.listdir(folder / component) if f.endswith(".safetensors")]
    path = folder / component / files[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ComponentLoadError, match=f"{component}.*{files[0]} cannot be read"):
        _load(folder)


def test_garbage_tokenizer_json_names_the_file(folder):
    (folder / "tokenizer" / "tokenizer.json").write_bytes(b"\x00\xff garbage {")
    with pytest.raises(ComponentLoadError, match=r"tokenizer.json is not valid JSON"):
        _load(folder)


def test_swapped_weight_files(folder):
    shutil.copy(folder / "transformer" / WEIGHTS, folder / "residual_head" / WEIGHTS)
    with pytest.raises(ComponentLoadError, match=r"HARTResidualHead .*missing: .*unexpected: "):
        _load(folder)


CONFIG_CASES = [
    ("vae", {"latent_channels": "abc"}, r"HARTHybridTokenizer config: `latent_channels` must be an integer"),
    ("residual_head", {"width": -4}, r"HARTResidualHead config: `width` must be an integer in \[1, 65536\]; got -4"),
    ("transformer", {"context_dim": 1e9}, r"HARTTransformer config: `context_dim`"),
    ("transformer", {"context_dim": 2 ** 30}, r"HARTTransformer config: `context_dim`"),
    ("transformer", {"num_layers": 0}, r"`num_layers` must be an integer in \[1, 1024\]; got 0"),
    ("transformer", {"patch_nums": None}, r"`patch_nums` must be a non-empty list"),
    ("vae", {"channel_multipliers": -1}, r"`channel_multipliers` must be a non-empty list"),
    ("vae", {"quant_resi": float("nan")}, r"`quant_resi` must be a finite number"),
    ("transformer", {"norm_eps": "1e-6"}, r"`norm_eps` must be a real number"),
    ("scheduler", {"num_train_timesteps": None}, r"HARTResidualScheduler config: `num_train_timesteps`"),
    ("scheduler", {"clip_sample": "yes"}, r"`clip_sample` must be True or False"),
    ("transformer", {"attn_l2_norm": "yes"}, r"HARTTransformer config: `attn_l2_norm` must be True or False"),
    ("transformer", {"attn_l2_norm": True}, r"HARTTransformer .*missing: .*scale_mul_1H11"),  # weights without it
]


@pytest.mark.parametrize("component, change, match", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))])
def test_bad_configs(folder, component, change, match):
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    _edit_json(folder / component / name, lambda c: {**c, **change})
    with pytest.raises(ValueError, match=match):
        _load(folder)


def test_config_without_patch_nums(folder):
    """Regression: the 1024px default schedule was used silently for a 64px model."""
    _edit_json(folder / "transformer" / "config.json", lambda c: {k: v for k, v in c.items() if k != "patch_nums"})
    with pytest.raises(ComponentLoadError, match=r"HARTTransformer .*config.json lacks patch_nums"):
        _load(folder)


def test_config_of_another_class(folder):
    shutil.copy(folder / "transformer" / "config.json", folder / "residual_head" / "config.json")
    with pytest.raises(ComponentLoadError, match="describes a HARTTransformer, not a HARTResidualHead"):
        HARTResidualHead.from_pretrained(folder, subfolder="residual_head")


def test_invalid_config_json(folder):
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"vae.*config.json"):
        _load(folder)


@pytest.mark.parametrize("content, match", [
    ("{oops", "model_index.json is not valid JSON"),
    ("[1, 2]", "model_index.json must hold a JSON object; got a list"),
])
def test_invalid_model_index(folder, content, match):
    (folder / "model_index.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        _load(folder)


@pytest.mark.parametrize("entry, value, match", [
    ("transformer", ["hart_pipeline.models.residual_head", "HARTResidualHead"], "`transformer` entry must be"),
    ("scheduler", ["diffusers", "DDPMScheduler"], "`scheduler` entry must be"),
    ("vae", "HARTHybridTokenizer", "`vae` entry must be"),
    ("use_system_prompt", "yes", "`use_system_prompt` must be true or false"),
    ("use_system_prompt", [], "`use_system_prompt` must be true or false"),  # crashed inside diffusers' type warning
    ("text_encoder", 1, "`text_encoder` entry must be"),
    ("tokenizer", ["transformers"], "`tokenizer` entry must be"),
])
def test_wrong_entries_in_model_index(folder, entry, value, match):
    _edit_json(folder / "model_index.json", lambda c: {**c, entry: value})
    with pytest.raises(ValueError, match=match):
        _load(folder)


@pytest.mark.parametrize("cls, subfolder", [(HARTTransformer, "transformer"), (HARTHybridTokenizer, "vae"),
                                            (HARTResidualHead, "residual_head")])
def test_component_level_loading_is_strict(folder, cls, subfolder):
    """The checks live in the component classes, so any pipeline loader gets them."""
    model, info = cls.from_pretrained(folder, subfolder=subfolder, output_loading_info=True)
    assert isinstance(model, cls) and info["missing_keys"] == info["unexpected_keys"] == []
    _edit_weights(folder / subfolder / WEIGHTS, _drop_first)
    # meta tensors or random initialisation: both refused (diffusers itself refuses low_cpu_mem_usage=False for a
    # model with fp32-kept modules, the tokenizer's quantizer)
    for low_cpu_mem_usage in (True,) if cls._keep_in_fp32_modules else (True, False):
        with pytest.raises(ComponentLoadError, match=f"{cls.__name__} .*missing"):
            cls.from_pretrained(folder / subfolder, low_cpu_mem_usage=low_cpu_mem_usage)


def test_official_layout_still_says_convert(tmp_path):
    (tmp_path / "llm").mkdir()
    with pytest.raises(ValueError, match="hart convert"):
        _load(tmp_path)
