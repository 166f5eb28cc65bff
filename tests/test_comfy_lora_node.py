"""HART LoRA Loader node: the adapter changes the output, strength 0 is the base, the input model stays the base."""

import pytest
import torch
from peft import LoraConfig

from comfy_nodes import nodes as N
from comfy_nodes import runtime
from comfy_nodes.handles import HARTModel
from hart_pipeline.lora import RESIDUAL_HEAD_LORA_TARGETS, TRANSFORMER_LORA_TARGETS, lora_layers, lora_metadata

from conftest import tiny_pipeline

PROMPT = "a red circle"


def lora_file(folder) -> None:
    """A rank-4 LoRA with random (non-zero) B matrices, saved in diffusers' format into ``folder``."""
    source = tiny_pipeline()
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(TRANSFORMER_LORA_TARGETS)))
    source.residual_head.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(RESIDUAL_HEAD_LORA_TARGETS)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (source.transformer, source.residual_head):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    source.save_lora_weights(str(folder), transformer_lora_layers=lora_layers(source.transformer),
                             residual_head_lora_layers=lora_layers(source.residual_head),
                             transformer_lora_adapter_metadata=lora_metadata(source.transformer),
                             residual_head_lora_adapter_metadata=lora_metadata(source.residual_head))


@pytest.fixture()
def model(tmp_path, monkeypatch):
    (tmp_path / "style").mkdir()
    lora_file(tmp_path / "style")
    monkeypatch.setenv("HART_LORAS_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "EXAMPLE_LORAS", str(tmp_path / "no_examples"))  # only this test's LoRA is listed
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return HARTModel(pipe=pipe, name="tiny", device=torch.device("cpu"), offload_device=torch.device("cpu"),
                     dtype=torch.float32)


def image(model) -> torch.Tensor:
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "auto", 1, 4)
    (tokens,) = N.residual_diffusion(model, tokens, 2, -1.0, -1)
    return N.tokenizer_decode(model, tokens, False)[0]


def test_lora_node_changes_the_output_and_leaves_the_input_model_alone(model):
    base = image(model)
    assert N.SPECS_BY_ID["HARTLoraLoader"].inputs[1].combo_options() == ["style/pytorch_lora_weights.safetensors"]
    (styled,) = N.load_lora(model, "style/pytorch_lora_weights.safetensors", 1.0)
    (off,) = N.load_lora(model, "style/pytorch_lora_weights.safetensors", 0.0)
    with_lora = image(styled)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(image(off), base)  # strength 0 = the base model
    torch.testing.assert_close(image(model), base)  # the loader's input keeps running without the adapter
    torch.testing.assert_close(image(styled), with_lora)  # the adapter is loaded once and re-activated
    assert sum(len(a) for a in model.pipe.get_list_adapters().values()) == 2  # one adapter, in both components


def test_lora_node_errors(model):
    with pytest.raises(FileNotFoundError, match="models/loras"):
        N.load_lora(model, "missing.safetensors", 1.0)
    with pytest.raises(ValueError, match="strength"):
        N.load_lora(model, "style/pytorch_lora_weights.safetensors", float("nan"))


def test_an_empty_loras_folder_says_so_and_running_the_node_explains(model, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HART_LORAS_DIR", str(empty))
    assert runtime.list_loras() == [runtime.NO_LORA]  # not an empty combo (ComfyUI shows "undefined")
    with pytest.raises(FileNotFoundError, match="holds no .safetensors file.*--lora_rank"):
        N.load_lora(model, runtime.NO_LORA, 1.0)
