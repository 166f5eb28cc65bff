"""Offload and placement: every diffusers offload mode gives the no-offload image, and its hooks see
every stage (instrumented on CPU; the execution device is the CPU here, so misses are detected by state,
meta or emptied weights rather than by a device mismatch)."""

import accelerate.hooks
import numpy as np
import pytest
import torch

from conftest import tiny_pipeline

PROMPT = "a red circle above a blue square"
CPU = torch.device("cpu")


def run(pipe, **kwargs):
    return pipe(PROMPT, negative_prompt="green", num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def reference():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return run(pipe)


def fresh():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_model_cpu_offload_hooks_see_every_stage(reference, monkeypatch):
    pipe = fresh()
    pipe.enable_model_cpu_offload(device=CPU)
    names = {id(getattr(pipe, n)): n for n in ("text_encoder", "transformer", "residual_head")}
    onloaded, pre_forwards, misses = {}, {n: 0 for n in names.values()}, []
    pre_forward, offload = accelerate.hooks.CpuOffload.pre_forward, accelerate.hooks.UserCpuOffloadHook.offload

    def counting_pre_forward(self, module, *args, **kwargs):
        if id(module) in names:
            pre_forwards[names[id(module)]] += 1
            onloaded.clear()  # the hook chain offloads the previous model
            onloaded[names[id(module)]] = True
        return pre_forward(self, module, *args, **kwargs)

    def tracking_offload(self):
        onloaded.pop(names.get(id(self.model)), None)
        return offload(self)

    monkeypatch.setattr(accelerate.hooks.CpuOffload, "pre_forward", counting_pre_forward)
    monkeypatch.setattr(accelerate.hooks.UserCpuOffloadHook, "offload", tracking_offload)
    handles = []
    for component_id, name in names.items():
        component = pipe.components[name]
        for sub_name, sub in component.named_modules():
            if sub is not component:  # every computation inside the component must run while it is onloaded
                handles.append(sub.register_forward_pre_hook(
                    lambda m, a, name=name, sub_name=sub_name: None if onloaded.get(name) else misses.append((name, sub_name))))
    try:
        image = run(pipe)
    finally:
        for h in handles:
            h.remove()
    assert misses == []
    num_scales = len(pipe.transformer.config.patch_nums)
    # text: prompt + negative prompt; transformer: one call per scale + the residual condition;
    # residual head: one call per step
    assert pre_forwards == {"text_encoder": 2, "transformer": num_scales + 1, "residual_head": 3}
    assert np.array_equal(image, reference)


def test_sequential_cpu_offload(reference, monkeypatch):
    """Weights live on the meta device between hooked calls: any computation outside a hook fails."""
    import accelerate

    # diffusers names the CPU "cpu:0", which accelerate 1.15 cannot load parameters to (a GPU is "cuda:0")
    cpu_offload = accelerate.cpu_offload
    monkeypatch.setattr(accelerate, "cpu_offload", lambda model, device, **kw: cpu_offload(model, CPU, **kw))
    pipe = fresh()
    pipe.enable_sequential_cpu_offload(device=CPU)
    assert pipe.transformer.blocks[0].attn.qkv_proj.weight.device.type == "meta"
    assert pipe.vae.quantizer.embedding.weight.device == CPU  # excluded: used at every scale
    assert np.array_equal(run(pipe), reference)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload(reference, offload_type, tmp_path):
    """Offloaded to disk, the weights in memory are emptied: any computation outside its group's onload
    would read garbage and change the image."""
    pipe = fresh()
    pipe.enable_group_offload(CPU, offload_device=CPU, offload_type=offload_type, num_blocks_per_group=1,
                              offload_to_disk_path=str(tmp_path))
    assert np.array_equal(run(pipe), reference)
    assert any(tmp_path.rglob("*.safetensors"))


def test_device_map(reference, tmp_path):
    from hart_pipeline import HARTPipeline

    fresh().save_pretrained(tmp_path / "model")
    pipe = HARTPipeline.from_pretrained(tmp_path / "model", device_map="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.hf_device_map is not None
    assert np.array_equal(run(pipe), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["model", "sequential", "group"])
def test_offload_on_cuda(reference, mode):
    pipe = fresh()
    if mode == "model":
        pipe.enable_model_cpu_offload()
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1)
    image = run(pipe)
    assert np.abs(image - reference).max() < 2e-2  # CUDA kernels round differently from the CPU ones
