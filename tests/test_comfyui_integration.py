"""The node pack in a real ComfyUI server: node definitions, every example workflow, previews, interrupt.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout whose requirements are installed for the
Python running the tests (``COMFYUI_PYTHON`` picks another interpreter for the server). ``COMFYUI_ARGS``
adds server arguments (default ``--cpu`` without CUDA). Run it with::

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q -m slow tests/test_comfyui_integration.py -s

The server runs on 127.0.0.1 with a temporary base directory holding only this pack (a symlink to the
repository in ``custom_nodes/``), the ``input/`` folder the pack fills with its example images, and the outputs; it prints its figures.
"""

import asyncio
import io
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch

import comfy_frontend as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run this test")]
with open(os.path.join(ROOT, "node_list.json")) as _f:  # every node of the pack (test_comfy_nodes keeps it current)
    HART_NODES = list(json.load(_f))
PREVIEW_EVENTS = (1, 4)  # BinaryEventTypes.PREVIEW_IMAGE and PREVIEW_IMAGE_WITH_METADATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, **env_extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        default_args = "" if torch.cuda.is_available() else "--cpu"
        args = shlex.split(os.environ.get("COMFYUI_ARGS", default_args))
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_extra}
        self.log = open(os.path.join(base, "server.log"), "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", base,
             "--disable-auto-launch", *args], cwd=COMFYUI, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log.name}")
            try:
                self.get("/object_info/HARTLoader")
                break
            except OSError:
                if time.monotonic() - self.started > 300:
                    raise
                time.sleep(1)
        self.startup_s = time.monotonic() - self.started

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return json.loads(data) if r.headers.get_content_type() == "application/json" else data

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _start(tmp_path_factory, **env_extra) -> Server:
    base = str(tmp_path_factory.mktemp("comfyui"))
    for folder in ("custom_nodes", "input", "output", "models", "user", "temp"):
        os.makedirs(os.path.join(base, folder), exist_ok=True)
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "hart_diffusers"))
    # (no example image copied by hand: the pack puts hart_shapes.png / hart_shapes_mask.png in input/ itself)
    srv = Server(base, **env_extra)
    srv.base = base
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _start(tmp_path_factory)  # the comfy_api (io.ComfyNode) registration, the default
    yield srv
    srv.stop()


async def _run(server: Server, prompt: dict, interrupt_after_progress: int = 0) -> dict:
    """Queue ``prompt`` over a websocket session; collect its events until it ends (or is interrupted)."""
    import aiohttp

    client_id = f"hart-test-{time.monotonic_ns()}"
    events = {"progress": [], "previews": 0, "status": None}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                answer = await r.json()
                assert r.status == 200, answer
            prompt_id = answer["prompt_id"]
            start = time.monotonic()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if struct.unpack(">I", msg.data[:4])[0] in PREVIEW_EVENTS:
                        events["previews"] += 1
                    continue
                data = json.loads(msg.data)
                kind, body = data["type"], data.get("data", {})
                if body.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress":
                    events["progress"].append((body["node"], body["value"], body["max"]))
                    if interrupt_after_progress and len(events["progress"]) == interrupt_after_progress:
                        events["interrupt_sent"] = time.monotonic()
                        await session.post(f"{server.url}/interrupt")
                elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                    events["status"], events["message"] = kind, body
                    break
            events["seconds"] = time.monotonic() - start
            events["ended"] = time.monotonic()
    events["history"] = server.get(f"/history/{prompt_id}").get(prompt_id, {})
    return events


def _output_images(server: Server, history: dict):
    from PIL import Image

    images = {}
    for node_id, output in history.get("outputs", {}).items():
        for item in output.get("images", []):
            query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
            images.setdefault(node_id, []).append(np.asarray(Image.open(io.BytesIO(server.get(f"/view?{query}")))))
    return images


def _workflow_prompt(server: Server, name: str) -> dict:
    with open(os.path.join(ROOT, "example_workflows", f"{name}.json")) as f:
        workflow = json.load(f)
    infos = {n["type"]: server.get(f"/object_info/{n['type']}")[n["type"]] for n in workflow["nodes"]}
    return F.ui_to_api(workflow, infos)


def test_object_info_and_the_frontend_view_of_the_nodes(server):
    info = server.get("/object_info")
    assert set(HART_NODES) <= set(info)
    assert F.widget_names(info["HARTResidualDiffusion"]) == ["steps", "guidance", "seed", "preview"]
    ar = F.widget_names(info["HARTARSampler"])
    assert ar[ar.index("seed") + 1] == F.CONTROL
    assert {"64", "128", "1024"} <= set(F.combo_options(info["HARTARSampler"]["input"]["required"]["size"]))
    for node_id in HART_NODES:  # the help pages the frontend fetches for custom nodes
        page = server.get(f"/extensions/hart_diffusers/docs/{node_id}.md").decode()
        assert page.startswith("# HART")
    print(f"\n[comfyui] server up in {server.startup_s:.1f} s; {len(HART_NODES)} HART nodes in /object_info, "
          "help pages served")


def test_classic_registration_gives_the_frontend_the_same_widgets(server, tmp_path_factory):
    classic = _start(tmp_path_factory, HART_COMFY_API="classic")
    try:
        for node_id in HART_NODES:
            ours, theirs = server.get(f"/object_info/{node_id}")[node_id], classic.get(f"/object_info/{node_id}")[node_id]
            assert F.widget_names(theirs) == F.widget_names(ours), node_id
            assert F.socket_names(theirs) == F.socket_names(ours), node_id
    finally:
        classic.stop()


def test_text_to_image_workflow_with_previews(server):
    prompt = _workflow_prompt(server, "text_to_image")
    first = asyncio.run(_run(server, prompt))
    assert first["status"] == "execution_success", first.get("message")
    ar_node = next(k for k, v in prompt.items() if v["class_type"] == "HARTARSampler")
    ar_steps = [p for p in first["progress"] if p[0] == ar_node]
    assert len(ar_steps) == ar_steps[-1][2] >= 4  # one progress step per scale
    assert first["previews"] >= len(ar_steps) + 1  # every scale + the residual stage
    images = _output_images(server, first["history"])
    (saved,) = images[next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")]
    assert saved.shape == (64, 64, 3) and saved.std() > 10  # an image, not a flat field
    prompt[ar_node]["inputs"]["seed"] = 1  # a new seed re-runs the sampler; the residual seed stays -1
    second = asyncio.run(_run(server, prompt))
    (other,) = _output_images(server, second["history"])[next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")]
    assert not np.array_equal(saved, other)
    print(f"\n[comfyui] text_to_image: {first['seconds']:.2f} s (first run, model load included), "
          f"{second['seconds']:.2f} s (new seed); {len(ar_steps)} scales, {first['previews']} previews")


def test_reconstruction_workflow(server):
    from PIL import Image

    prompt = _workflow_prompt(server, "reconstruction")
    events = asyncio.run(_run(server, prompt))
    assert events["status"] == "execution_success", events.get("message")
    (out,) = next(iter(_output_images(server, events["history"]).values()))
    source = Image.open(os.path.join(ROOT, "example_workflows", "hart_shapes.png")).convert("RGB")
    reference = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    reference = torch.nn.functional.interpolate(reference, size=out.shape[:2], mode="bicubic", antialias=True)
    error = ((torch.from_numpy(out.astype(np.float32) / 255).permute(2, 0, 1)[None] - reference.clamp(0, 1)) ** 2).mean()
    psnr = float(-10 * torch.log10(error))
    assert psnr > 20
    print(f"\n[comfyui] reconstruction: {events['seconds']:.2f} s, PSNR {psnr:.1f} dB")


def test_outpainting_workflow(server):
    """Pad the shapes image (ComfyUI's Pad Image for Outpainting), repaint the border with HART Inpaint."""
    from PIL import Image

    prompt = _workflow_prompt(server, "outpainting")
    events = asyncio.run(_run(server, prompt))
    assert events["status"] == "execution_success", events.get("message")
    (out,) = next(iter(_output_images(server, events["history"]).values()))
    assert out.shape == (64, 64, 3)
    # the centre (inside the 16 px pad of the 96 px canvas, resized to 64) keeps the image's tokens
    source = Image.open(os.path.join(ROOT, "example_workflows", "hart_shapes.png")).convert("RGB").resize((42, 42))
    centre = out[11:53, 11:53].astype(np.float32)
    error = float(np.abs(centre - np.asarray(source, dtype=np.float32)).mean())
    assert error < 40
    print(f"\n[comfyui] outpainting: {events['seconds']:.2f} s, centre mean abs error {error:.1f}/255")


@pytest.mark.parametrize("name", ["inpainting", "variation", "lora"])
def test_editing_and_lora_workflows(server, name):
    """The examples that load the pack's own inputs (the mask image, the example LoRA) run as opened."""
    prompt = _workflow_prompt(server, name)
    events = asyncio.run(_run(server, prompt))
    assert events["status"] == "execution_success", events.get("message")
    (out,) = next(iter(_output_images(server, events["history"]).values()))
    assert out.shape == (64, 64, 3) and out.std() > 5
    print(f"\n[comfyui] {name}: {events['seconds']:.2f} s")


def test_interrupt_and_node_errors(server):
    prompt = _workflow_prompt(server, "text_to_image")
    ar_node = next(k for k, v in prompt.items() if v["class_type"] == "HARTARSampler")
    prompt[ar_node]["inputs"].update(size="512", batch_size=4, seed=2)  # 14 scales: long enough to interrupt mid-way
    events = asyncio.run(_run(server, prompt, interrupt_after_progress=2))
    assert events["status"] == "execution_interrupted"
    latency = events["ended"] - events["interrupt_sent"]
    assert latency < 10
    prompt[ar_node]["inputs"].update(size="1024", batch_size=1)  # not a size of the built-in model
    error = asyncio.run(_run(server, prompt))
    assert error["status"] == "execution_error"
    assert "valid: auto, 64 (its own), 128, 256, 512" in error["message"]["exception_message"]
    def loads():
        with open(os.path.join(server.base, "server.log")) as f:
            return f.read().count("Requested to load ManagedHARTHybridTokenizer")

    before = loads()
    server.post("/free", {"unload_models": True, "free_memory": True})  # ComfyUI's "free memory"
    again = asyncio.run(_run(server, _workflow_prompt(server, "reconstruction")))
    assert again["status"] == "execution_success", again.get("message")
    assert loads() == before + 1  # the tokenizer had been evicted by /free and is loaded again
    print(f"\n[comfyui] interrupt: stopped {latency:.2f} s after /interrupt; size error: "
          f"{error['message']['exception_message']!r}")


def test_components_live_in_comfyui_model_management():
    """In-process, with ComfyUI's own model management: a stage registers the HART components as loaded
    models; making room for another model (``free_memory``, what ``load_models_gpu`` calls) evicts them, and
    the next stage loads them again."""
    sys.path.insert(0, COMFYUI)
    try:
        from comfy.cli_args import args

        args.cpu = args.cpu or not torch.cuda.is_available()  # what --cpu does, before model management reads it
        import comfy.model_management as mm

        from comfy_nodes import nodes as N

        (model,) = N.load_model(N.BUILTIN_MODEL, N.OWN_TEXT_ENCODER, "auto", "auto", False)
        (positive,) = N.text_encode(model, "a green circle above a red square")
        N.ar_sample(model, positive, 0, 4.5, -1, 0.0, True, "auto", 1, 4)

        def ours():
            return sorted(type(m.model.model).__name__ for m in mm.current_loaded_models
                          if any(m.model is p for p in model.patchers.values()))

        assert ours() == ["ManagedBertModel", "ManagedHARTHybridTokenizer", "ManagedHARTTransformer"]
        mm.free_memory(1e30, model.device)  # another model needs all the room
        assert ours() == []
        N.ar_sample(model, positive, 0, 4.5, -1, 0.0, True, "auto", 1, 4)
        assert ours() == ["ManagedHARTHybridTokenizer", "ManagedHARTTransformer"]
    finally:
        sys.path.remove(COMFYUI)
