"""The ComfyUI node pack (comfy_nodes/) without ComfyUI: declarations, example workflows, parity with
HARTPipeline, interrupts and the tokenizer round trip, all on the tiny random pipeline on CPU."""

import asyncio
import inspect
import json
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import comfy_nodes  # noqa: E402
from comfy_nodes import nodes as N  # noqa: E402
from comfy_nodes.handles import HARTConditioning, HARTModel  # noqa: E402
from comfy_nodes.registration import classic_mappings, v3_node  # noqa: E402

from conftest import tiny_pipeline  # noqa: E402

PROMPT = "a red circle above a blue square"
CLASSIC, DISPLAY = classic_mappings()
CORE_NODES = {  # ComfyUI core nodes the examples use: socket inputs, output types, widget names
    "LoadImage": ({}, ["IMAGE", "MASK"], ["image", "upload"]),
    "SaveImage": ({"images": "IMAGE"}, [], ["filename_prefix"]),
    "PreviewImage": ({"images": "IMAGE"}, [], []),
}


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
        if i.type == "COMBO":
            assert i.default in i.combo_options()
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
    assert N.model_options() == [N.BUILTIN_MODEL, "mine", "official"]
    assert fp.folder_names_and_paths["hart"][0] == [str(tmp_path / "hart")]


# ------------------------------------------------------------------------------------------------ workflows
def _node_io(node_type):
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    spec = N.SPECS_BY_ID[node_type]
    return ({i.name: i.type for i in spec.inputs if not i.is_widget}, [o.type for o in spec.outputs],
            [i.name for i in spec.inputs if i.is_widget])


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


@pytest.mark.parametrize("name", ["text_to_image", "reconstruction"])
def test_example_workflow_ui_format(name):
    with open(os.path.join(ROOT, "example_workflows", f"{name}.json")) as f:
        wf = json.load(f)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        assert _node_io(nodes[src]["type"])[1][src_slot] == link_type
        assert nodes[dst]["inputs"][dst_slot]["type"] == link_type and nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
    for node in nodes.values():
        sockets, outputs, widgets = _node_io(node["type"])
        assert [(i["name"], i["type"]) for i in node["inputs"]] == list(sockets.items())
        assert [o["type"] for o in node["outputs"]] == outputs
        if node["type"] in CORE_NODES:
            assert len(node["widgets_values"]) == len(widgets)
            continue
        spec = N.SPECS_BY_ID[node["type"]]
        values = list(node["widgets_values"])
        for i in (i for i in spec.inputs if i.is_widget):
            _check_widget(i, values.pop(0))
            if i.control_after_generate:
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert values == []
        for i in spec.inputs:
            if not i.is_widget and not i.optional:
                assert next(x for x in node["inputs"] if x["name"] == i.name)["link"] is not None, (node["type"], i.name)


@pytest.mark.parametrize("name", ["text_to_image", "reconstruction"])
def test_example_workflow_api_format(name):
    with open(os.path.join(ROOT, "example_workflows", f"{name}_api.json")) as f:
        wf = json.load(f)
    for node in wf.values():
        sockets, _, widgets = _node_io(node["class_type"])
        for key, value in node["inputs"].items():
            if key in sockets:
                src = wf[value[0]]
                assert _node_io(src["class_type"])[1][value[1]] == sockets[key]
            else:
                assert key in widgets
                if node["class_type"] in N.SPECS_BY_ID:
                    _check_widget(next(i for i in N.SPECS_BY_ID[node["class_type"]].inputs if i.name == key), value)
        if node["class_type"] in N.SPECS_BY_ID:
            required = {i.name for i in N.SPECS_BY_ID[node["class_type"]].inputs if not i.optional}
            assert required <= set(node["inputs"])


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

        def update(self, n):
            self.n += n

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
    assert bars[0].total == 4 and bars[0].n == 2


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

    def widget(extra):
        params = ["default", "socketless", "force_input", *extra]

        class W(Input):
            def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **kwargs):
                unknown = set(kwargs) - set(params)
                assert not unknown, unknown
                super().__init__(id, display_name, optional, tooltip, lazy, **kwargs)
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
        Int=widget(["min", "max", "step", "control_after_generate", "display_mode"]),
        Float=widget(["min", "max", "step", "round", "display_mode"]),
        String=widget(["multiline", "placeholder", "dynamic_prompts"]),
        Boolean=widget(["label_on", "label_off"]),
        Combo=types.SimpleNamespace(Input=lambda id, options=None, **kw: widget(["control_after_generate", "upload"]).Input(
            id, default=kw.pop("default", None), **kw)),
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
