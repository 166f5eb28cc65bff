"""LoRA: adapters trained a few steps change the output, round-trip through a file, fuse, unfuse and unload."""

import os

import pytest
import torch
from peft import LoraConfig

from hart_pipeline import HARTResidualScheduler
from hart_pipeline.lora import (
    LORA_WEIGHT_NAME,
    RESIDUAL_HEAD_LORA_TARGETS,
    TRANSFORMER_LORA_TARGETS,
    lora_layers,
    lora_metadata,
)
from hart_pipeline.training.losses import transformer_loss

from conftest import tiny_pipeline


def generate(pipe) -> torch.Tensor:
    """Images (1, 3, 64, 64) in [0, 1] for a fixed prompt and seed (2 residual steps: fast)."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red circle", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images


def train_lora(pipe, steps: int = 3) -> None:
    """Add a rank-4 LoRA to the transformer and the head and train only it for a few steps."""
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(TRANSFORMER_LORA_TARGETS)))
    pipe.residual_head.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(RESIDUAL_HEAD_LORA_TARGETS)))
    params = [p for m in (pipe.transformer, pipe.residual_head) for n, p in m.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    frozen = [p for m in (pipe.transformer, pipe.residual_head) for n, p in m.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in frozen)  # add_adapter freezes the base
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    scheduler = HARTResidualScheduler()
    scheduler.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        tokens = pipe.vae.encode(images)
    context = torch.randn(2, 8, 32, generator=g)
    positions = torch.arange(8)[None].repeat(2, 1)
    for step in range(steps):
        out = transformer_loss(pipe.transformer, pipe.residual_head, pipe.vae, scheduler.tables, context, positions,
                               tokens.indices, tokens.residual, cond_drop_prob=0.0, generator=g)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base output, LoRA output, folder holding the saved LoRA)."""
    pipe = tiny_pipeline()
    base = generate(pipe)
    train_lora(pipe)
    with_lora = generate(pipe)
    folder = str(tmp_path_factory.mktemp("lora"))
    pipe.save_lora_weights(folder, transformer_lora_layers=lora_layers(pipe.transformer),
                           residual_head_lora_layers=lora_layers(pipe.residual_head),
                           transformer_lora_adapter_metadata=lora_metadata(pipe.transformer),
                           residual_head_lora_adapter_metadata=lora_metadata(pipe.residual_head))
    return base, with_lora, folder


def test_trained_lora_changes_the_output(trained):
    base, with_lora, _ = trained
    assert (base - with_lora).abs().max() > 0.05


@pytest.mark.parametrize("source", ["folder", "file"])
def test_save_then_load_gives_the_same_output(trained, source):
    from safetensors.torch import load_file

    _, with_lora, folder = trained
    path = os.path.join(folder, LORA_WEIGHT_NAME)
    keys = load_file(path).keys()
    assert any(k.startswith("transformer.blocks.0.attn.qkv_proj.lora_A") for k in keys)  # diffusers' key format
    assert any(k.startswith("residual_head.res_blocks.0.mlp.0.lora_B") for k in keys)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder if source == "folder" else path, adapter_name="shapes")  # alpha from the metadata
    assert pipe.get_list_adapters() == {"transformer": ["shapes"], "residual_head": ["shapes"]}
    assert torch.equal(generate(pipe), with_lora)


def test_fuse_equals_unfused(trained):
    base, with_lora, folder = trained
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder, adapter_name="shapes")
    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    assert torch.allclose(generate(pipe), with_lora, atol=1e-4)
    pipe.unfuse_lora()
    assert torch.allclose(generate(pipe), with_lora, atol=1e-4)


def test_set_adapters_scales_and_unload_restores_the_base_exactly(trained):
    base, with_lora, folder = trained
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder, adapter_name="shapes")
    pipe.set_adapters(["shapes"], adapter_weights=[0.0])
    assert torch.allclose(generate(pipe), base, atol=1e-4)  # weight 0: the adapter contributes nothing
    pipe.set_adapters(["shapes"], adapter_weights=[1.0])
    assert torch.equal(generate(pipe), with_lora)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base)  # the plain layers are back, bit for bit
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())


def test_bad_lora_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipeline()
    pickled = tmp_path / "lora.bin"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="safetensors"):
        pipe.load_lora_weights(str(pickled))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ValueError, match="Not a HART LoRA"):
        pipe.load_lora_weights(str(foreign))


@pytest.fixture(scope="module")
def partial_loras(trained, tmp_path_factory):
    """{covered component(s): (folder of a LoRA covering only them, output with that LoRA)} from the trained one."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, with_lora, folder = trained
    path = os.path.join(folder, LORA_WEIGHT_NAME)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    out = {"both": (folder, with_lora)}
    for name in ("transformer", "residual_head"):
        sub = str(tmp_path_factory.mktemp(f"lora_{name}"))
        save_file({k: v for k, v in state.items() if k.startswith(f"{name}.")}, os.path.join(sub, LORA_WEIGHT_NAME),
                  metadata=metadata)
        pipe = tiny_pipeline()
        pipe.load_lora_weights(sub, adapter_name="part")
        out[name] = (sub, generate(pipe))
    return out


@pytest.mark.parametrize("covered", ["transformer", "residual_head", "both"])
def test_lora_on_one_component_fuses_scales_and_unloads(trained, partial_loras, covered):
    """An adapter may cover only the transformer or only the head: the other component is left alone."""
    base = trained[0]
    folder, with_lora = partial_loras[covered]
    assert (with_lora - base).abs().max() > 1e-3  # each part of the LoRA changes the image by itself
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder, adapter_name="part")
    covers = {"transformer", "residual_head"} if covered == "both" else {covered}
    assert set(pipe.get_list_adapters()) == covers
    pipe.set_adapters("part", 0.0)
    assert torch.allclose(generate(pipe), base, atol=1e-4)
    pipe.set_adapters("part", 1.0)
    assert torch.allclose(generate(pipe), with_lora, atol=1e-5)
    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    assert torch.allclose(generate(pipe), with_lora, atol=1e-4)
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    assert torch.allclose(generate(pipe), with_lora, atol=1e-4)
    pipe.unload_lora_weights()
    assert torch.allclose(generate(pipe), base, atol=1e-4)  # fuse + unfuse round the base weights (fp32 noise)
    assert not any("lora_" in n for m in (pipe.transformer, pipe.residual_head) for n, _ in m.named_parameters())


def test_fuse_without_an_adapter_says_what_to_do():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="no LoRA adapter is loaded.*load_lora_weights"):
        pipe.fuse_lora()
    with pytest.raises(ValueError, match="take no LoRA"):
        pipe.fuse_lora(components=["vae"])
