"""ComfyUI's runtime services (devices, progress bars, interrupts, model folders), with plain fallbacks.

Every ComfyUI module is imported at call time, so the nodes run (and are tested) without ComfyUI, and a
test can stand in for ComfyUI by putting fake ``comfy.*`` / ``folder_paths`` modules in ``sys.modules``.
"""

import importlib
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
    """``comfy.utils.ProgressBar`` when running inside ComfyUI, else a silent counter."""

    def __init__(self, total: int):
        self.total, self.value = total, 0
        utils = _module("comfy.utils")
        self._bar = utils.ProgressBar(total) if utils is not None and hasattr(utils, "ProgressBar") else None

    def update(self, n: int = 1) -> None:
        self.value += n
        if self._bar is not None:
            self._bar.update(n)


# ---------------------------------------------------------------------------------------------- model folders
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
            if not os.path.isdir(path):
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
