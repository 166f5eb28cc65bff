"""The ComfyUI node pack (comfy_nodes/) without ComfyUI: declarations, example workflows, parity with
HARTPipeline, interrupts and the tokenizer round trip, all on the tiny random pipeline on CPU."""

import asyncio
import inspect
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import comfy_nodes  # noqa: E402
from comfy_nodes import nodes as N  # noqa: E402
from comfy_nodes import runtime  # noqa: E402
from comfy_nodes.handles import HARTConditioning, HARTModel  # noqa: E402
from comfy_nodes.registration import classic_mappings, v3_node  # noqa: E402

import comfy_frontend as F  # noqa: E402
from conftest import tiny_pipeline  # noqa: E402
from hart_pipeline import HARTPipeline, HARTResidualScheduler  # noqa: E402

PROMPT = "a red circle above a blue square"
CLASSIC, DISPLAY = classic_mappings()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return HARTModel(pipe=pipe, name="tiny", device=torch.device("cpu"), offload_device=torch.device("cpu"),
                     dtype=torch.float32)


def run_chain(model, seed=7, batch_size=1, **ar):
    (pos,) = N.text_encode(model, PROMPT)
    (neg,) = N.empty_conditioning()
    kwargs = dict(seed=seed, guidance=4.5, top_k=-1, top_p=0.0, smooth=True, size="auto", batch_size=batch_size,
                  keep_scales=4, negative=neg)
    kwargs.update(ar)
    (tokens,) = N.ar_sample(model, pos, **kwargs)
    (tokens,) = N.residual_diffusion(model, tokens, steps=8, guidance=-1.0, seed=-1)
    (image,) = N.tokenizer_decode(model, tokens, discrete_only=False)
    return image


# ------------------------------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("spec", N.NODE_SPECS, ids=lambda s: s.node_id)
def test_declared_inputs_match_the_function_signature(spec):
    params = inspect.signature(spec.function).parameters
    assert list(params) == [i.name for i in spec.inputs if not i.optional] + [i.name for i in spec.inputs if i.optional]
    for i in spec.inputs:
        assert (params[i.name].default is None) if i.optional else params[i.name].default is inspect.Parameter.empty
        assert i.tooltip
        if i.type == "COMBO":  # file lists (LoRAs) may be empty: no default
            assert i.default is None if i.name == "lora_name" else i.default in i.combo_options()
        elif i.is_widget and i.min is not None:
            assert i.min <= i.default <= i.max
    cls = CLASSIC[spec.node_id]
    types_ = cls.INPUT_TYPES()
    assert list(types_["required"]) + list(types_.get("optional", {})) == list(params)
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(spec.outputs)
    assert callable(getattr(cls, cls.FUNCTION)) and DISPLAY[spec.node_id].startswith("HART")


def test_package_exports_and_model_folder(monkeypatch, tmp_path):
    assert comfy_nodes.API == "classic" and comfy_nodes.NODE_CLASS_MAPPINGS is comfy_nodes.CLASSIC_NODE_CLASS_MAPPINGS
    assert set(comfy_nodes.NODE_CLASS_MAPPINGS) == {s.node_id for s in N.NODE_SPECS}
    fp = types.ModuleType("folder_paths")
    fp.models_dir, fp.folder_names_and_paths = str(tmp_path), {}
    fp.add_model_folder_path = lambda name, path, is_default=False: fp.folder_names_and_paths.setdefault(name, ([path], set()))
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    (tmp_path / "hart" / "mine").mkdir(parents=True)
    (tmp_path / "hart" / "mine" / "model_index.json").write_text("{}")
    (tmp_path / "hart" / "official" / "llm").mkdir(parents=True)
    (tmp_path / "hart" / "official" / "tokenizer").mkdir()
    assert N.model_options() == [N.BUILTIN_MODEL, "mit-han-lab/hart-0.7b-1024px", "mine", "official"]
    assert fp.folder_names_and_paths["hart"][0] == [str(tmp_path / "hart")]


def test_example_inputs_are_copied_into_comfyui_input_once(monkeypatch, tmp_path):
    """The reconstruction / outpainting examples load hart_shapes.png: the pack puts it in input/ (never over a
    user's file of the same name)."""

    fp = types.ModuleType("folder_paths")
    fp.get_input_directory = lambda: str(tmp_path / "input")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    written = runtime.install_example_inputs()
    target = tmp_path / "input" / "hart_shapes.png"
    assert written == [str(tmp_path / "input" / name) for name in runtime.EXAMPLE_INPUTS] and target.read_bytes() == open(os.path.join(runtime.EXAMPLE_DIR, "hart_shapes.png"), "rb").read()
    target.write_bytes(b"the user's own image")
    assert runtime.install_example_inputs() == [] and target.read_bytes() == b"the user's own image"


def test_loader_refuses_an_unavailable_device_before_loading():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error of a CPU-only torch")
    with pytest.raises(ValueError, match="'cuda' is not available"):
        N.load_model(N.BUILTIN_MODEL, N.OWN_TEXT_ENCODER, "auto", "cuda", False)


# ------------------------------------------------------------------------------------------------ workflows
CORE_OBJECT_INFO = {  # ComfyUI's core nodes the examples use, as /object_info describes them
    "LoadImage": {"input": {"required": {"image": [["hart_shapes.png"], {"image_upload": True}]}},
                  "output": ["IMAGE", "MASK"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "output": []},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": []},
    "LoadImageMask": {"input": {"required": {"image": [["hart_shapes_mask.png"], {"image_upload": True}],
                                             "channel": [["alpha", "red", "green", "blue"]]}}, "output": ["MASK"]},
    "ImagePadForOutpaint": {"input": {"required": {
        "image": ["IMAGE", {}], **{side: ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}]
                                   for side in ("left", "top", "right", "bottom")},
        "feathering": ["INT", {"default": 40, "min": 0, "max": 16384, "step": 1}]}}, "output": ["IMAGE", "MASK"]},
}


def classic_object_info(node_id):
    """/object_info of a classic node: ComfyUI's node_info serves INPUT_TYPES() and its key order."""
    cls = CLASSIC[node_id]
    types_ = cls.INPUT_TYPES()
    return {"input": types_, "input_order": {k: list(v) for k, v in types_.items()}, "output": list(cls.RETURN_TYPES)}


def object_info(node_id):
    return CORE_OBJECT_INFO[node_id] if node_id in CORE_OBJECT_INFO else classic_object_info(node_id)


def frontend_widgets(node_id):
    return F.widget_names(object_info(node_id))


# one per node family: text to image, tokenizer round trip, outpainting and inpainting, variation, LoRA
EXAMPLES = ["text_to_image", "reconstruction", "outpainting", "inpainting", "variation", "lora"]


def load_workflow(name):
    with open(os.path.join(ROOT, "example_workflows", f"{name}.json")) as f:
        return json.load(f)


def test_example_workflows_are_all_ui_format():
    """ComfyUI lists example_workflows/ as templates: only UI-format files belong there (API copies: tests/)."""
    names = [n for n in sorted(os.listdir(os.path.join(ROOT, "example_workflows"))) if n.endswith(".json")]
    assert {f"{name}.json" for name in EXAMPLES} == set(names)
    for name in names:
        assert {"nodes", "links", "last_node_id", "version"} <= set(load_workflow(name[:-5])), name


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflow_ui_format(name):
    wf = load_workflow(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        assert object_info(nodes[src]["type"])["output"][src_slot] == link_type
        assert nodes[dst]["inputs"][dst_slot]["type"] == link_type and nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
    for node in nodes.values():
        info = object_info(node["type"])
        assert [i["name"] for i in node["inputs"]] == F.socket_names(info)
        assert [o["type"] for o in node["outputs"]] == info["output"]
        widgets = frontend_widgets(node["type"])
        assert len(node.get("widgets_values", [])) == len(widgets), (node["type"], widgets)  # what the frontend makes
        if node["type"] in CORE_OBJECT_INFO:
            continue
        spec = N.SPECS_BY_ID[node["type"]]
        for wname, value in zip(widgets, node["widgets_values"]):
            if wname == F.CONTROL:
                assert value in F.CONTROL_VALUES
            else:
                _check_widget(next(i for i in spec.inputs if i.name == wname), value)
        for i in spec.inputs:
            if not i.is_widget and not i.optional:
                assert next(x for x in node["inputs"] if x["name"] == i.name)["link"] is not None, (node["type"], i.name)


def _check_widget(spec_input, value):
    if spec_input.type == "COMBO":
        assert value in spec_input.combo_options(), (spec_input.name, value)
    elif spec_input.type in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert spec_input.min <= value <= spec_input.max and (spec_input.type == "FLOAT" or isinstance(value, int))
    elif spec_input.type == "BOOLEAN":
        assert isinstance(value, bool)
    else:
        assert isinstance(value, str)


@pytest.mark.parametrize("name", EXAMPLES)
def test_ui_workflow_round_trips_to_the_api_copy(name):
    """The frontend's own widget mapping turns the saved UI workflow into exactly the API prompt in tests/."""
    wf = load_workflow(name)
    infos = {n["type"]: object_info(n["type"]) for n in wf["nodes"]}
    with open(os.path.join(ROOT, "tests", "workflows", f"{name}_api.json")) as f:
        api = json.load(f)
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert F.ui_to_api(wf, infos) == expected
    for node in expected.values():  # every HART node gets exactly its function's arguments
        if node["class_type"] in N.SPECS_BY_ID:
            spec = N.SPECS_BY_ID[node["class_type"]]
            assert {i.name for i in spec.inputs if not i.optional} <= set(node["inputs"]) <= {i.name for i in spec.inputs}


def api_workflow(name):
    with open(os.path.join(ROOT, "tests", "workflows", f"{name}_api.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def workflow_runner():
    sys.path.insert(0, os.path.join(ROOT, "examples", "comfyui"))
    import run_workflow

    return run_workflow


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_workflow_runs_with_the_built_in_model(name, workflow_runner):
    """Each example as ComfyUI would queue it (its API copy), executed with the node functions and ComfyUI's core
    nodes' semantics (examples/comfyui/run_workflow.py); it has a template thumbnail beside it."""
    saved = workflow_runner.run(api_workflow(name))
    (image,) = saved[next(k for k in saved if k != "preview")]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all() and image.std() > 0.02
    assert os.path.isfile(os.path.join(ROOT, "example_workflows", f"{name}.jpg")), "run_workflow.py --thumbnails"
    if name == "inpainting":  # the mask (right half) is repainted, the left half keeps the image's tokens
        source = workflow_runner.load_image("hart_shapes.png")[0]
        source = torch.nn.functional.interpolate(source.permute(0, 3, 1, 2), size=64, mode="area").permute(0, 2, 3, 1)
        assert (image[:, :, :24] - source[:, :, :24]).abs().mean() < 0.1
        assert (image[:, :, 40:] - source[:, :, 40:]).abs().mean() > 0.1


def test_lora_workflow_applies_the_shipped_lora(workflow_runner):
    prompt = api_workflow("lora")
    loader = next(k for k, v in prompt.items() if v["class_type"] == "HARTLoraLoader")
    assert prompt[loader]["inputs"]["lora_name"] in runtime.list_loras()  # the pack's example LoRA is listed
    with_lora = workflow_runner.run(prompt)["HART_lora"][0]
    prompt[loader]["inputs"]["strength"] = 0.0
    without = workflow_runner.run(prompt)["HART_lora"][0]
    assert (with_lora - without).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ parity
def test_node_chain_gives_the_pipeline_image(pipe, model):
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="pt").images
    image = run_chain(model, seed=7)
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
    torch.testing.assert_close(image, expected.permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert not torch.allclose(run_chain(model, seed=8), image)


def test_batch_and_negative_prompt_match_the_pipeline(pipe, model):
    expected = pipe(PROMPT, negative_prompt="blue", num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images
    (neg,) = N.text_encode(model, "blue")
    image = run_chain(model, seed=3, batch_size=2, negative=neg)
    torch.testing.assert_close(image, expected.permute(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_generate_node_and_registrations_match(pipe, model):
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(5), output_type="pt").images.permute(0, 2, 3, 1)
    (image,) = CLASSIC["HARTGenerate"]().run(model=model, prompt=PROMPT, negative_prompt="", seed=5, size="auto",
                                             steps=8, guidance=4.5, batch_size=1)
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_residual_seed_and_guidance_options(model):
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.ar_sample(model, pos, 1, 4.5, -1, 0.0, True, "auto", 1, 4)
    a = N.residual_diffusion(model, tokens, 8, -1.0, -1)[0].tokens.residual
    b = N.residual_diffusion(model, tokens, 8, -1.0, -1)[0].tokens.residual
    c = N.residual_diffusion(model, tokens, 8, -1.0, 11)[0].tokens.residual
    torch.testing.assert_close(a, b)  # deterministic: ComfyUI may re-run a node from cache
    assert not torch.allclose(a, c)
    assert N.residual_diffusion(model, tokens, 8, 2.0, -1)[0].tokens.residual_guidance == 2.0
    assert tokens.tokens.residual is None  # inputs are never modified in place


def test_residual_guidance_default_is_the_models(pipe):
    """guidance -1 = what HARTPipeline uses: the scheduler's guidance_scale when the model sets one."""
    configured = HARTPipeline(**{**pipe.components, "scheduler": HARTResidualScheduler(guidance_scale=0.0)})
    model = HARTModel(pipe=configured, name="tiny", device=torch.device("cpu"), offload_device=torch.device("cpu"),
                      dtype=torch.float32)
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.ar_sample(model, pos, 1, 4.5, -1, 0.0, True, "auto", 1, 4)
    out = N.residual_diffusion(model, tokens, 8, -1.0, -1)[0].tokens
    assert out.residual_guidance == 0.0
    expected = configured(PROMPT, generator=torch.Generator().manual_seed(1), output_type="latent").images
    torch.testing.assert_close(out.residual, expected.residual)


def test_interrupt_stops_the_ar_loop_between_scales(model, monkeypatch):
    class Interrupted(Exception):
        pass

    calls, bars = [], []

    def throw():
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted

    class ProgressBar:
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.n = value

    comfy = types.ModuleType("comfy")
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.throw_exception_if_processing_interrupted = throw
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    for name, module in [("comfy", comfy), ("comfy.model_management", comfy.model_management), ("comfy.utils", comfy.utils)]:
        monkeypatch.setitem(sys.modules, name, module)
    scales = []
    transformer = model.pipe.transformer
    original = transformer.forward_scale
    monkeypatch.setattr(transformer, "forward_scale", lambda x, si, *a, **k: scales.append(si) or original(x, si, *a, **k))
    (pos,) = N.text_encode(model, PROMPT)
    with pytest.raises(Interrupted):
        N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "auto", 1, 4)
    assert scales == [0, 1] and len(calls) == 2  # stopped after the second of four scales
    assert bars[0].total == 4 and bars[0].n == 1  # the interrupted scale is not reported as done


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_encode_decode_round_trip(model):
    torch.manual_seed(0)
    image = torch.rand(2, 80, 96, 3)
    (tokens,) = N.tokenizer_encode(model, image, resize="auto")  # center crop 80x80, resize to 64
    assert tokens.patch_nums == (1, 2, 3, 4) and [i.shape for i in tokens.tokens.indices] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    for discrete_only in (False, True):
        (out,) = N.tokenizer_decode(model, tokens, discrete_only)
        assert out.shape == (2, 64, 64, 3) and out.min() >= 0 and out.max() <= 1
    hybrid = N.tokenizer_decode(model, tokens, False)[0]
    expected = model.pipe.vae.decode(tokens.tokens.indices, tokens.tokens.residual).sample
    torch.testing.assert_close(hybrid, ((expected + 1) / 2).permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="residual condition"):
        N.residual_diffusion(model, tokens, 8, -1.0, -1)


def test_prefix_keeps_the_encoded_coarse_scales(model):
    (tokens,) = N.tokenizer_encode(model, torch.rand(1, 64, 64, 3), resize="none")
    (pos,) = N.text_encode(model, PROMPT)
    (out,) = N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "auto", 2, 3, prefix=tokens)
    for kept, mine in zip(tokens.tokens.indices[:3], out.tokens.indices[:3]):
        assert torch.equal(mine, kept.expand(2, -1))


def test_loader_reads_a_saved_pipeline_folder(pipe, tmp_path, monkeypatch):
    pipe.save_pretrained(str(tmp_path / "tiny"))
    monkeypatch.setenv("HART_MODELS_DIR", str(tmp_path))
    assert "tiny" in N.model_options()
    (loaded,) = N.load_model("tiny", N.OWN_TEXT_ENCODER, "auto", "cpu", False)
    assert loaded.dtype == torch.float32 and loaded.pipe.transformer.device.type == "cpu"
    with pytest.raises(FileNotFoundError, match="models/hart"):
        N.load_model("missing", N.OWN_TEXT_ENCODER, "auto", "cpu", False)


# ------------------------------------------------------------------------------------------------ comfy_api stub
def _fake_comfy_api():
    """A stand-in for ``comfy_api.latest`` with the constructor signatures ComfyUI documents."""

    class Input:
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **kwargs):
            self.id, self.optional, self.tooltip, self.kwargs = id, optional, tooltip, kwargs

    def widget(io_type, extra):
        params = ["default", "socketless", "force_input", *extra]

        class W(Input):
            def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **kwargs):
                unknown = set(kwargs) - set(params)
                assert not unknown, unknown
                super().__init__(id, display_name, optional, tooltip, lazy, **kwargs)
        W.io_type = io_type
        return types.SimpleNamespace(Input=W, Output=None)

    class Output:
        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
            self.display_name, self.tooltip = display_name, tooltip

    def custom(io_type):
        return types.SimpleNamespace(Input=type("I", (Input,), {"io_type": io_type}),
                                     Output=type("O", (Output,), {"io_type": io_type}))

    class ComfyNode:
        pass

    class NodeOutput:
        def __init__(self, *args):
            self.args = args

    io = types.SimpleNamespace(
        Int=widget("INT", ["min", "max", "step", "control_after_generate", "display_mode"]),
        Float=widget("FLOAT", ["min", "max", "step", "round", "display_mode"]),
        String=widget("STRING", ["multiline", "placeholder", "dynamic_prompts"]),
        Boolean=widget("BOOLEAN", ["label_on", "label_off"]),
        Combo=widget("COMBO", ["options", "control_after_generate", "upload"]),
        Image=custom("IMAGE"), Custom=custom, ComfyNode=ComfyNode, NodeOutput=NodeOutput,
        Schema=lambda **kw: types.SimpleNamespace(**kw),
    )
    return io


def test_comfy_api_registration_uses_the_same_specs(model, monkeypatch):
    io = _fake_comfy_api()
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    from comfy_nodes.registration import v3_extension

    entrypoint, classes = v3_extension()
    extension = asyncio.run(entrypoint())
    assert [c.SPEC.node_id for c in asyncio.run(extension.get_node_list())] == [s.node_id for s in N.NODE_SPECS]
    for cls in classes:
        schema = cls.define_schema()
        assert schema.node_id == cls.SPEC.node_id and [i.id for i in schema.inputs] == [i.name for i in cls.SPEC.inputs]
        assert len(schema.outputs) == len(cls.SPEC.outputs) and all(i.tooltip for i in schema.inputs)
    (cond,) = v3_node(io, N.SPECS_BY_ID["HARTTextEncode"]).execute(model=model, prompt=PROMPT).args
    assert isinstance(cond, HARTConditioning) and cond.attention_mask.shape == cond.position_ids.shape


# ------------------------------------------------------------------------------------------------ seeds
def _v3_object_info(node_id):
    """/object_info of the comfy_api node: the fake io records every keyword, None pruned (prune_dict)."""
    io = _fake_comfy_api()
    schema = v3_node(io, N.SPECS_BY_ID[node_id]).define_schema()
    info = {"input": {}, "input_order": {}}
    for i in schema.inputs:
        group = "optional" if i.optional else "required"
        options = {k: v for k, v in {"tooltip": i.tooltip, **i.kwargs}.items() if v is not None}
        info["input"].setdefault(group, {})[i.id] = [i.io_type, options]
        info["input_order"].setdefault(group, []).append(i.id)
    return info


@pytest.mark.parametrize("registration", ["classic", "comfy_api"])
def test_seed_widgets_as_the_frontend_builds_them(registration):
    info = classic_object_info if registration == "classic" else _v3_object_info
    residual = info("HARTResidualDiffusion")
    assert F.widget_names(residual) == ["steps", "guidance", "seed", "preview"]  # no randomize widget
    assert residual["input"]["required"]["seed"][1]["default"] == -1
    assert F.combo_options(info("HARTGenerate")["input"]["required"]["size"])[:3] == ["auto", "64", "128"]
    assert "continue the AR sampler" in residual["input"]["required"]["seed"][1]["tooltip"]
    for node_id in ("HARTARSampler", "HARTGenerate"):  # fresh seeds keep ComfyUI's usual control widget
        names = F.widget_names(info(node_id))
        assert names[names.index("seed") + 1] == F.CONTROL
    for node_id in N.SPECS_BY_ID:  # every seed says whether it wants the control: the frontend never guesses
        for name, spec in F.ordered_inputs(info(node_id)):
            if name == "seed":
                assert F.CONTROL in spec[1]


# ------------------------------------------------------------------------------------------------ sizes
def test_size_choices_cover_known_models_and_are_checked_against_the_loaded_one(model):
    options = N.size_options()
    assert options[0] == "auto" and {"64", "128", "256", "512", "1024"} <= set(options)  # built-in 64/128, released 1024
    assert sorted(model.pipe.supported_sizes) == [64, 256, 512, 1024]  # tiny: 16x downsampling, own schedule 64
    (pos,) = N.text_encode(model, PROMPT)
    with pytest.raises(ValueError, match=r"`size` = 128 .*valid: auto, 64 \(its own\), 256, 512, 1024"):
        N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "128", 1, 4)
    with pytest.raises(ValueError, match="`size` = 128"):
        N.generate(model, PROMPT, "", 0, "128", 8, 4.5, 1)
    with pytest.raises(ValueError, match="`resize` = 128"):
        N.tokenizer_encode(model, torch.rand(1, 64, 64, 3), "128")
    (tokens,) = N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "256", 1, 4)
    assert tokens.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def test_size_choices_include_model_folders(pipe, tmp_path, monkeypatch):
    from hart_pipeline import HARTPipeline

    odd = HARTPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                       transformer=type(pipe.transformer)(**{**pipe.transformer.config, "patch_nums": (1, 2, 3, 5)}),
                       residual_head=pipe.residual_head, scheduler=pipe.scheduler)
    odd.save_pretrained(str(tmp_path / "odd"))
    monkeypatch.setenv("HART_MODELS_DIR", str(tmp_path))
    assert "80" in N.size_options()  # its own schedule ends at 5: 5 x 16


def test_tokenizer_encode_uses_the_models_schedule_for_other_sizes(model):
    (tokens,) = N.tokenizer_encode(model, torch.rand(1, 256, 256, 3), "none")
    assert tokens.patch_nums == model.pipe.supported_sizes[256]


# ------------------------------------------------------------------------------------------------ previews
class _Bars:
    """A stand-in for comfy.utils.ProgressBar recording (value, total, preview) updates."""

    def __init__(self, monkeypatch):
        self.bars = []
        outer = self

        class ProgressBar:
            def __init__(self, total):
                self.total, self.calls = total, []
                outer.bars.append(self)

            def update_absolute(self, value, total=None, preview=None):
                self.calls.append((value, total, preview))

        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = ProgressBar
        monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
        monkeypatch.setitem(sys.modules, "comfy.utils", utils)


def test_previews_after_every_scale_and_after_the_residual_stage(model, monkeypatch):
    recorded = _Bars(monkeypatch)
    (pos,) = N.text_encode(model, PROMPT)
    (tokens,) = N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "auto", 1, 4)
    N.residual_diffusion(model, tokens, 8, -1.0, -1)
    ar, res = recorded.bars
    assert [c[0] for c in ar.calls] == [1, 2, 3, 4] and all(c[2] is not None for c in ar.calls)
    fmt, image, max_side = ar.calls[-1][2]
    assert fmt == "JPEG" and max_side == 512 and image.size == (512, 512)  # the 64px decode upscaled 8x
    assert [c[2] is not None for c in res.calls] == [False] * 8 + [True]
    discrete = N.tokenizer_decode(model, tokens, True)[0][0]  # the last scale's preview is the discrete image
    torch.testing.assert_close(torch.tensor(np.array(image))[::8, ::8].float() / 255, discrete, atol=0.5 / 255, rtol=0)
    N.generate(model, PROMPT, "", 0, "auto", 8, 4.5, 1)
    generate_calls = recorded.bars[2].calls  # 4 scales with previews, then the 8 residual steps
    assert [c[0] for c in generate_calls] == list(range(1, 13))
    assert [c[2] is not None for c in generate_calls] == [True] * 4 + [False] * 8
    N.ar_sample(model, pos, 0, 4.5, -1, 0.0, True, "auto", 1, 4, preview=False)
    N.residual_diffusion(model, tokens, 8, -1.0, -1, preview=False)
    assert all(c[2] is None for bar in recorded.bars[3:] for c in bar.calls) and len(recorded.bars[3].calls) == 4


def test_preview_is_a_low_resolution_decode(model):
    from hart_pipeline import HARTTokens, decode_tokens
    from hart_pipeline.preview import preview_images

    vae = model.pipe.vae
    latent = torch.randn(2, vae.config.latent_channels, 4, 4)
    exact = decode_tokens(vae, HARTTokens(indices=[], latent=latent))
    torch.testing.assert_close(preview_images(vae, latent), exact)  # small latents: the decoded image itself
    big = torch.randn(1, vae.config.latent_channels, 8, 8)  # larger than max_latent_side: pooled first
    pooled = torch.nn.functional.avg_pool2d(big, 4)
    preview = preview_images(vae, big, max_latent_side=2)
    torch.testing.assert_close(preview, decode_tokens(vae, HARTTokens(indices=[], latent=pooled)))
    assert preview.shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ validation
def test_node_inputs_are_validated_with_clear_errors(model):
    (pos,) = N.text_encode(model, PROMPT)
    ar = dict(seed=0, guidance=4.5, top_k=-1, top_p=0.0, smooth=True, size="auto", batch_size=1, keep_scales=4)
    for bad, match in [(dict(seed=-5), "`seed`"), (dict(seed=2 ** 64), "`seed`"), (dict(top_p=1.0), "`top_p`"),
                       (dict(top_p=1.5), "`top_p`"), (dict(guidance=float("nan")), "`guidance`"),
                       (dict(guidance=float("inf")), "`guidance`"), (dict(top_k=-2), "`top_k`"),
                       (dict(top_k=2.5), "`top_k`")]:
        with pytest.raises(ValueError, match=match):
            N.ar_sample(model, pos, **{**ar, **bad})
    with pytest.raises(ValueError, match="`seed`"):
        N.generate(model, PROMPT, "", -1, "auto", 8, 4.5, 1)
    with pytest.raises(ValueError, match="`guidance`"):
        N.generate(model, PROMPT, "", 0, "auto", 8, float("nan"), 1)
    (tokens,) = N.ar_sample(model, pos, **ar)
    for bad, match in [(dict(seed=-2), "`seed`"), (dict(guidance=float("nan")), "`guidance`"),
                       (dict(guidance=-0.5), "`guidance`"), (dict(steps=1), "`steps`")]:
        with pytest.raises(ValueError, match=match):
            N.residual_diffusion(model, tokens, **{**dict(steps=8, guidance=-1.0, seed=-1), **bad})
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"`image` .*0\.\.255: divide by 255"):
        N.tokenizer_encode(model, image * 255, "auto")
    with pytest.raises(ValueError, match="`image` contains NaN"):
        N.tokenizer_encode(model, torch.where(image > 0.5, float("nan"), image), "auto")
    with pytest.raises(ValueError, match="`image` must be a ComfyUI IMAGE"):
        N.tokenizer_encode(model, image[0], "auto")
    with pytest.raises(ValueError, match="with resize = none it must be square"):
        N.tokenizer_encode(model, torch.rand(1, 64, 80, 3), "none")
    (encoded,) = N.tokenizer_encode(model, image, "auto")
    encoded.tokens.indices[2] = encoded.tokens.indices[2] + 5000
    with pytest.raises(ValueError, match=r"`tokens` .*codebook has 1024 entries"):
        N.tokenizer_decode(model, encoded, False)
    with pytest.raises(ValueError, match=r"`prefix` .*codebook has 1024 entries"):
        N.ar_sample(model, pos, **ar, prefix=encoded)
    with pytest.raises(ValueError, match="`dtype`"):
        N.load_model(N.BUILTIN_MODEL, N.OWN_TEXT_ENCODER, "float64", "cpu", False)


# ------------------------------------------------------------------------------------------------ released model
def _fake_hub(monkeypatch, calls, fail=False):
    import shutil

    import huggingface_hub

    from conftest import FIXTURES, tiny_text_encoder, tiny_text_tokenizer

    def snapshot_download(repo_id, local_dir, ignore_patterns=None, **kwargs):
        calls.append(repo_id)
        if fail:
            raise huggingface_hub.errors.LocalEntryNotFoundError("offline")
        if repo_id == "mit-han-lab/hart-0.7b-1024px":
            shutil.copytree(os.path.join(FIXTURES, "parity", "tiny4", "official"), local_dir, dirs_exist_ok=True)
        else:
            tiny_text_encoder().save_pretrained(local_dir)
            tiny_text_tokenizer().save_pretrained(local_dir)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_released_model_is_downloaded_converted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HART_MODELS_DIR", str(tmp_path))
    calls = []
    _fake_hub(monkeypatch, calls)
    (loaded,) = N.load_model("mit-han-lab/hart-0.7b-1024px", N.OWN_TEXT_ENCODER, "auto", "cpu", False)
    assert calls == ["mit-han-lab/hart-0.7b-1024px", "mit-han-lab/Qwen2-VL-1.5B-Instruct"]
    assert (tmp_path / "hart-0.7b-1024px-diffusers" / "model_index.json").is_file()
    assert loaded.pipe.text_encoder is not None and loaded.pipe.transformer.config.context_dim == 32
    (cond,) = N.text_encode(loaded, PROMPT)
    (tokens,) = N.ar_sample(loaded, cond, 0, 4.5, -1, 0.0, True, "auto", 1, 4)
    assert len(tokens.tokens.indices) == len(loaded.pipe.transformer.config.patch_nums)
    N.load_model("mit-han-lab/hart-0.7b-1024px", N.OWN_TEXT_ENCODER, "auto", "cpu", False)
    assert len(calls) == 2  # cached: no second download or conversion
    assert "hart-0.7b-1024px-diffusers" in N.model_options()


def test_released_model_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HART_MODELS_DIR", str(tmp_path))
    _fake_hub(monkeypatch, [], fail=True)
    with pytest.raises(RuntimeError, match=r"Could not download mit-han-lab/hart-0\.7b-1024px .*huggingface-cli download"):
        N.load_model("mit-han-lab/hart-0.7b-1024px", N.OWN_TEXT_ENCODER, "auto", "cpu", False)
    assert not (tmp_path / "hart-0.7b-1024px-diffusers").exists()


# ------------------------------------------------------------------------------------------------ model management
def test_components_go_through_comfy_model_management(monkeypatch):
    """With comfy.model_management present, every stage loads its components with load_models_gpu (so other
    models' loads and "free memory" can evict them) and the offload switch unloads them after the stage."""
    pipe = tiny_pipeline()  # its own: offloading to meta and back (to_empty) leaves uninitialised weights
    events = []

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    class LoadedModel:
        def __init__(self, patcher):
            self.model = patcher

        def model_unload(self):
            events.append(("unload", type(self.model.model.module).__name__))
            self.model.model.to(self.model.offload_device)

    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []

    def load_models_gpu(patchers, force_full_load=False):
        events.append(("load", sorted(type(p.model.module).__name__ for p in patchers)))
        for p in patchers:
            p.model.to(p.load_device)
            if not any(m.model is p for m in mm.current_loaded_models):
                mm.current_loaded_models.append(LoadedModel(p))

    mm.load_models_gpu = load_models_gpu
    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = ModelPatcher
    for name, module in [("comfy", types.ModuleType("comfy")), ("comfy.model_management", mm),
                         ("comfy.model_patcher", mp)]:
        monkeypatch.setitem(sys.modules, name, module)
    for offload in (False, True):
        events.clear()
        handle = HARTModel(pipe=pipe, name="tiny", device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           dtype=torch.float32, offload=offload)
        handle.offload_device = torch.device("meta") if offload else handle.device  # observable offload target
        (pos,) = N.text_encode(handle, PROMPT)
        assert events[0] == ("load", ["Qwen2Model"])
        if offload:
            assert events[1] == ("unload", "Qwen2Model") and pipe.text_encoder.device.type == "meta"
            pipe.text_encoder.to_empty(device="cpu")
        else:
            assert len(events) == 1 and len(mm.current_loaded_models) == 1
        mm.current_loaded_models.clear()
    assert isinstance(handle.patcher("vae").model, comfy_nodes.runtime.ManagedModule)


# ------------------------------------------------------------------------------------------------ discoverability
def test_manager_node_list_help_pages_aliases_and_registry_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(os.path.join(ROOT, "node_list.json")) as f:
        listed = json.load(f)
    assert listed == {s.node_id: s.description for s in N.NODE_SPECS}, (  # what ComfyUI-Manager's scanner reads
        "regenerate node_list.json: {node_id: description} of comfy_nodes.nodes.NODE_SPECS")
    docs = os.path.join(comfy_nodes.WEB_DIRECTORY, "docs")
    assert sorted(os.listdir(docs)) == sorted(f"{s.node_id}.md" for s in N.NODE_SPECS)
    for spec in N.NODE_SPECS:
        with open(os.path.join(docs, f"{spec.node_id}.md")) as f:
            page = f.read()
        assert page.startswith(f"# {spec.display_name}\n")
        missing = [i.name for i in spec.inputs if f"**{i.name}**" not in page]
        assert not missing, (spec.node_id, missing)  # every input is explained
        assert spec.search_aliases and CLASSIC[spec.node_id].SEARCH_ALIASES == list(spec.search_aliases)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    comfy = project["tool"]["comfy"]
    assert comfy["Icon"].endswith("comfy_nodes/web/icon.svg") and os.path.isfile(os.path.join(ROOT, "comfy_nodes/web/icon.svg"))
    assert comfy["requires-comfyui"].startswith(">=") and comfy["PublisherId"] and comfy["DisplayName"]
    assert "Operating System :: OS Independent" in project["project"]["classifiers"]


def test_fuzz_findings_end_in_clear_errors(model):
    """Values an outside fuzz campaign sent through links: each names the input and the fix."""
    (pos,) = N.text_encode(model, PROMPT)
    ar = dict(seed=0, guidance=4.5, top_k=-1, top_p=0.0, smooth=True, size="auto", batch_size=1, keep_scales=4)
    for batch_size in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="`batch_size` must be a whole number from 1 to 64"):
            N.ar_sample(model, pos, **{**ar, "batch_size": batch_size})
        with pytest.raises(ValueError, match="`batch_size` must be a whole number from 1 to 64"):
            N.generate(model, PROMPT, "", 0, "auto", 8, 4.5, batch_size)
    for not_tokens in ("tokens", None, pos):
        with pytest.raises(ValueError, match="`tokens` must be the output of HART"):
            N.tokenizer_decode(model, not_tokens, False)
        with pytest.raises(ValueError, match="`tokens` must be the output of HART"):
            N.residual_diffusion(model, not_tokens, steps=8, guidance=-1.0, seed=-1)
    with pytest.raises(ValueError, match="`positive` must be the output of HART Text Encode"):
        N.ar_sample(model, "a red circle", **ar)
    narrow = HARTConditioning(embeds=torch.zeros(1, pos.embeds.shape[1], 7), position_ids=pos.position_ids)
    with pytest.raises(ValueError, match="negative conditioning's text states are 7 wide.*same model's HART Text Encode"):
        N.ar_sample(model, pos, **ar, negative=narrow)
    (small,) = N.tokenizer_encode(model, torch.rand(1, 64, 64, 3), "none")  # scales 1 2 3 4 at 64 px
    with pytest.raises(ValueError, match="prefix was encoded at 64 px.*encode the image at 256 px"):
        N.ar_sample(model, pos, **{**ar, "size": "256", "keep_scales": 6}, prefix=small)  # 256 px: 1 2 3 4 5 6 ...
    (tokens,) = N.ar_sample(model, pos, **{**ar, "size": "256", "keep_scales": 4}, prefix=small)  # shared scales
    assert all(torch.equal(a, b) for a, b in zip(tokens.tokens.indices[:4], small.tokens.indices))
