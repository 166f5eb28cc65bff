"""ComfyUI's runtime services (devices, progress bars, interrupts, model folders), with plain fallbacks.

Every ComfyUI module is imported at call time, so the nodes run (and are tested) without ComfyUI, and a
test can stand in for ComfyUI by putting fake ``comfy.*`` / ``folder_paths`` modules in ``sys.modules``.
"""

import importlib
import json
import os
from typing import List, Optional

import torch

MODEL_FOLDER = "hart"  # ComfyUI/models/hart/<model folder>


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _mm():
    return _module("comfy.model_management")


def torch_device() -> torch.device:
    """ComfyUI's compute device, else CUDA when available, else CPU."""
    mm = _mm()
    if mm is not None and hasattr(mm, "get_torch_device"):
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    """Where idle weights wait: ComfyUI's ``unet_offload_device`` (usually CPU), else CPU."""
    mm = _mm()
    if mm is not None and hasattr(mm, "unet_offload_device"):
        return torch.device(mm.unet_offload_device())
    return torch.device("cpu")


def soft_empty_cache() -> None:
    mm = _mm()
    if mm is not None and hasattr(mm, "soft_empty_cache"):
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    mm = _mm()
    if mm is not None and hasattr(mm, "throw_exception_if_processing_interrupted"):
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """``comfy.utils.ProgressBar`` when running inside ComfyUI, else a silent counter.

    ``update(n, preview=images)`` also sends the first of ``images`` ((B, 3, h, w) in [0, 1]) as the node's
    live preview, the way ComfyUI's samplers do (a ``("JPEG", PIL image, max side)`` tuple).
    """

    def __init__(self, total: int):
        self.total, self.value = total, 0
        utils = _module("comfy.utils")
        self._bar = utils.ProgressBar(total) if utils is not None and hasattr(utils, "ProgressBar") else None

    @property
    def shows_previews(self) -> bool:
        """Whether a preview passed to :meth:`update` is shown (only inside ComfyUI): skip making one otherwise."""
        return self._bar is not None

    def update(self, n: int = 1, preview: Optional[torch.Tensor] = None) -> None:
        self.value += n
        if self._bar is not None:
            self._bar.update_absolute(self.value, self.total, None if preview is None else preview_image(preview))


def preview_image(images: torch.Tensor):
    """ComfyUI's preview tuple for the first image, upscaled (nearest) towards ComfyUI's preview size."""
    from PIL import Image

    args = getattr(_module("comfy.cli_args"), "args", None)
    max_side = int(getattr(args, "preview_size", 512) or 512)
    pixels = (images[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    image = Image.fromarray(pixels)
    factor = max(1, max_side // max(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return ("JPEG", image, max_side)


# ---------------------------------------------------------------------------------------- model management
class ManagedModule(torch.nn.Module):
    """One HART component as ComfyUI's ``ModelPatcher`` expects a model: a plain module whose ``device``
    it can set (diffusers models expose ``device`` read-only) and on which it keeps its bookkeeping."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.device = device


_MANAGED_CLASSES: dict = {}


def model_management_available() -> bool:
    """True inside ComfyUI: its ``ModelPatcher`` and ``load_models_gpu`` can manage our components."""
    mp = _module("comfy.model_patcher")
    return mp is not None and hasattr(mp, "ModelPatcher") and hasattr(_mm(), "load_models_gpu")


def model_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """A ``comfy.model_patcher.ModelPatcher`` for ``module``, or None outside ComfyUI."""
    if not model_management_available():
        return None
    mp = _module("comfy.model_patcher")
    current = next(module.parameters(), torch.empty(0)).device
    name = type(module).__name__  # ComfyUI logs "Requested to load <class name>": name it after the component
    cls = _MANAGED_CLASSES.setdefault(name, type(f"Managed{name}", (ManagedModule,), {}))
    return mp.ModelPatcher(cls(module, current), load_device=load_device, offload_device=offload_device)


def load_patchers(patchers: List) -> None:
    """Load components through ComfyUI's ``load_models_gpu``: it makes room by evicting other models (and
    evicts ours when another model needs the room); "free memory" unloads them."""
    _mm().load_models_gpu(patchers, force_full_load=True)


def unload_patchers(patchers: List) -> None:
    """Move these components back to their offload device now (the loader's ``offload`` switch)."""
    mm = _mm()
    for loaded in list(getattr(mm, "current_loaded_models", [])):
        if any(loaded.model is p for p in patchers):
            loaded.model_unload()
            mm.current_loaded_models.remove(loaded)
    soft_empty_cache()


# ---------------------------------------------------------------------------------------------- model folders
# the images the example workflows load with LoadImage (they ship beside the workflows)
EXAMPLE_INPUTS = ("hart_shapes.png", "hart_shapes_mask.png")
EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
EXAMPLE_LORAS = os.path.join(EXAMPLE_DIR, "loras")


def install_example_inputs() -> List[str]:
    """Copy the example workflows' input images into ComfyUI's ``input/`` folder when they are not there yet
    (a file of the same name is never replaced), so every example runs as opened. Returns the files written."""
    fp = _module("folder_paths")
    if fp is None or not hasattr(fp, "get_input_directory"):
        return []
    import shutil

    written = []
    target_dir = fp.get_input_directory()
    for name in EXAMPLE_INPUTS:
        source, target = os.path.join(EXAMPLE_DIR, name), os.path.join(target_dir, name)
        if os.path.isfile(source) and not os.path.exists(target):
            try:
                os.makedirs(target_dir, exist_ok=True)
                shutil.copyfile(source, target + ".tmp")
                os.replace(target + ".tmp", target)  # whole or absent
                written.append(target)
            except OSError:  # a read-only input folder: the examples then need the image copied by hand
                pass
    return written


def register_model_folder() -> None:
    """Register ``models/hart`` with ComfyUI's ``folder_paths`` (no-op outside ComfyUI)."""
    fp = _module("folder_paths")
    if fp is None:
        return
    names = getattr(fp, "folder_names_and_paths", {})
    if MODEL_FOLDER in names:
        return
    path = os.path.join(fp.models_dir, MODEL_FOLDER)
    if hasattr(fp, "add_model_folder_path"):
        fp.add_model_folder_path(MODEL_FOLDER, path)
    else:
        names[MODEL_FOLDER] = ([path], set())
    if MODEL_FOLDER not in names:  # older add_model_folder_path only extends known folders
        names[MODEL_FOLDER] = ([path], set())


def model_roots() -> List[str]:
    """The folders searched for HART models: ComfyUI's ``hart`` paths, plus ``$HART_MODELS_DIR``."""
    roots: List[str] = []
    fp = _module("folder_paths")
    if fp is not None:
        register_model_folder()
        try:
            roots.extend(fp.get_folder_paths(MODEL_FOLDER))
        except Exception:
            pass
    if os.environ.get("HART_MODELS_DIR"):
        roots.append(os.environ["HART_MODELS_DIR"])
    return [r for r in dict.fromkeys(roots)]


def model_kind(folder: str) -> Optional[str]:
    """``"diffusers"`` (model_index.json), ``"official"`` (llm/ + tokenizer/), ``"text_encoder"`` or None."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return "diffusers"
    if os.path.isdir(os.path.join(folder, "llm")) and os.path.isdir(os.path.join(folder, "tokenizer")):
        return "official"
    if os.path.isfile(os.path.join(folder, "config.json")):
        return "text_encoder"
    return None


def list_folders(kinds=("diffusers", "official")) -> List[str]:
    """Names (relative to a model root, '/'-separated, up to two levels deep) of model folders of ``kinds``."""
    found: List[str] = []
    for root in model_roots():
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if not os.path.isdir(path) or name.endswith(".partial"):  # a conversion in progress
                continue
            if model_kind(path) in kinds:
                found.append(name)
            elif model_kind(path) is None:
                for sub in sorted(os.listdir(path)):
                    if os.path.isdir(os.path.join(path, sub)) and model_kind(os.path.join(path, sub)) in kinds:
                        found.append(f"{name}/{sub}")
    return list(dict.fromkeys(found))


def resolve_folder(name: str) -> str:
    """Absolute path of a folder listed by :func:`list_folders` (or an absolute path given as is)."""
    if os.path.isabs(name) and os.path.isdir(name):
        return name
    for root in model_roots():
        path = os.path.join(root, *name.split("/"))
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(
        f"HART model folder {name!r} not found in {model_roots() or ['(no hart model folder registered)']}; put "
        f"diffusers-layout or official-layout (llm/ + tokenizer/) folders in ComfyUI/models/{MODEL_FOLDER}/."
    )


def lora_roots() -> List[str]:
    """Folders searched for HART LoRA files: ComfyUI's ``loras`` paths, ``$HART_LORAS_DIR``, then the pack's own
    ``example_workflows/loras`` (the example LoRA of the LoRA workflow, made by the trainer from the built-in
    model: see the ComfyUI section of the README)."""
    roots: List[str] = []
    fp = _module("folder_paths")
    if fp is not None:
        try:
            roots.extend(fp.get_folder_paths("loras"))
        except Exception:
            pass
    if os.environ.get("HART_LORAS_DIR"):
        roots.append(os.environ["HART_LORAS_DIR"])
    if os.path.isdir(EXAMPLE_LORAS):
        roots.append(EXAMPLE_LORAS)
    return [r for r in dict.fromkeys(roots)]


NO_LORA = "(no .safetensors file in models/loras)"  # shown instead of an empty list (ComfyUI shows "undefined")


def list_loras() -> List[str]:
    """'/'-separated names of the ``.safetensors`` files under the LoRA folders (what the trainer writes), or
    [:data:`NO_LORA`] when there is none, so the widget says so and running the node explains what to do."""
    found: List[str] = []
    for root in lora_roots():
        for folder, _, files in os.walk(root):
            for file in sorted(files):
                if file.endswith(".safetensors"):
                    found.append(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
    return sorted(dict.fromkeys(found)) or [NO_LORA]


def resolve_lora(name: str) -> str:
    """Absolute path of a LoRA file listed by :func:`list_loras`."""
    if name == NO_LORA:
        raise FileNotFoundError(
            f"No HART LoRA to load: {lora_roots() or ['ComfyUI/models/loras']} holds no .safetensors file. Make one with "
            "`python -m hart_pipeline.training.train_transformer --pretrained_model default --lora_rank 8 --output_dir "
            "runs/lora` and copy runs/lora/pytorch_lora_weights.safetensors there (any name), or bypass this node.")
    for root in lora_roots():
        path = os.path.join(root, *name.split("/"))
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"HART LoRA {name!r} not found in {lora_roots() or ['(no loras folder registered)']}; put "
                            "the trainer's pytorch_lora_weights.safetensors (renamed as you like) in ComfyUI/models/loras/.")


def folder_sizes(folder: str) -> List[int]:
    """Image sides a diffusers-layout HART folder supports, read from its configs ([] when unreadable)."""
    from hart_pipeline.schedules import supported_sizes

    try:
        with open(os.path.join(folder, "transformer", "config.json")) as f:
            patch_nums = json.load(f)["patch_nums"]
        with open(os.path.join(folder, "vae", "config.json")) as f:
            factor = 2 ** (len(json.load(f)["channel_multipliers"]) - 1)
        return sorted(supported_sizes(patch_nums, factor))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return []


# ---------------------------------------------------------------------------------------------- downloads
RELEASED_MODELS = {  # Hub id -> its text encoder's Hub id
    "mit-han-lab/hart-0.7b-1024px": "mit-han-lab/Qwen2-VL-1.5B-Instruct",
}


def released_folder(repo_id: str) -> Optional[str]:
    """The converted folder of a released model if it is already in a model root, else None."""
    name = converted_name(repo_id)
    for root in model_roots():
        if os.path.isfile(os.path.join(root, name, "model_index.json")):
            return os.path.join(root, name)
    return None


def converted_name(repo_id: str) -> str:
    return repo_id.split("/")[-1] + "-diffusers"


def download_released(repo_id: str) -> str:
    """Download a released HART checkpoint and its text encoder into the first model root (ComfyUI/models/hart),
    convert it once to a diffusers folder (text encoder included) and return that folder; later calls
    return the cached folder without touching the network."""
    cached = released_folder(repo_id)
    if cached is not None:
        return cached
    roots = model_roots()
    if not roots:
        raise FileNotFoundError(f"No folder to download {repo_id} into: run inside ComfyUI (models/{MODEL_FOLDER}) or "
                                "set $HART_MODELS_DIR.")
    from huggingface_hub import snapshot_download

    from hart_pipeline.convert import convert

    root, text_repo = roots[0], RELEASED_MODELS[repo_id]
    sources = {}
    for repo, patterns in ((repo_id, ["llm/pytorch_model.bin"]), (text_repo, [])):  # the EMA weights are enough
        target = os.path.join(root, repo.split("/")[-1])
        try:
            sources[repo] = snapshot_download(repo, local_dir=target, ignore_patterns=patterns or None)
        except Exception as e:  # offline, DNS, HTTP errors, missing files: one message that says what to do
            raise RuntimeError(
                f"Could not download {repo} from the Hugging Face Hub ({type(e).__name__}: {e}). Connect to the "
                f"internet, or download it by hand: `huggingface-cli download {repo} --local-dir {target}`, then "
                f"pick the folder in HART Loader."
            ) from e
    final = os.path.join(root, converted_name(repo_id))
    partial = final + ".partial"
    convert(sources[repo_id], partial, text_encoder=sources[text_repo])
    os.replace(partial, final)  # a complete folder or none: an interrupted conversion is redone
    return final
