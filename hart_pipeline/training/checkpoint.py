"""Resumable training checkpoints written as safetensors + JSON only: nothing is pickled or unpickled.

A checkpoint folder ``checkpoints/step_{N}`` holds

* ``model.safetensors``: the trained weights (in LoRA mode only the adapter weights);
* ``ema.safetensors``: the EMA shadow weights (when EMA is on);
* ``optimizer_{rank}.safetensors``: each process's optimizer state (tensors; hyper-parameters and
  scalar state as JSON in the safetensors metadata);
* ``rng_{rank}.safetensors``: each process's torch / CUDA / numpy / python RNG states;
* ``trainer_state.json``: step, LR-schedule state, EMA counters, world size;
* ``checkpoint.json``: written last, the SHA-256 of every file above. A folder without it is
  incomplete; a file whose hash differs was modified or truncated: loading stops with a
  :class:`CheckpointError` naming the file.
"""

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

MANIFEST = "checkpoint.json"
STATE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from (missing, modified, truncated or mismatched file)."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ optimizer
def optimizer_to_safetensors(state_dict: dict):
    """``optimizer.state_dict()`` -> (tensors, JSON-able metadata). Tensor entries of the per-parameter
    state go to ``state.{param}.{name}``; everything else (hyper-parameters, Python scalars) to JSON."""
    tensors, scalars = {}, {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return _tensors(tensors), {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------------ RNG
def rng_to_safetensors():
    """The torch (CPU and CUDA), numpy and python RNG states of this process -> (tensors, metadata)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
               "python": torch.tensor(py_state[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], py_state[2]]}
    return _tensors(tensors), meta


def rng_from_safetensors(tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), py_gauss))


# ------------------------------------------------------------------------------------------------ save
def _save(tensors: Dict[str, torch.Tensor], meta: Optional[dict], path: str) -> None:
    save_file(tensors, path, metadata={"json": json.dumps(meta)} if meta is not None else None)


def save_checkpoint(folder: str, accelerator, model_state: Dict[str, torch.Tensor], optimizer, lr_scheduler,
                    step: int, ema=None) -> None:
    """Write a checkpoint from every process (call it on all of them). ``model_state`` is read on the main
    process only (e.g. ``accelerator.get_state_dict(module)``, filtered to what is trained)."""
    rank = accelerator.process_index
    os.makedirs(folder, exist_ok=True)
    accelerator.wait_for_everyone()
    _save(*optimizer_to_safetensors(optimizer.state_dict()), os.path.join(folder, f"optimizer_{rank}.safetensors"))
    _save(*rng_to_safetensors(), os.path.join(folder, f"rng_{rank}.safetensors"))
    if accelerator.is_main_process:
        _save(_tensors(model_state), None, os.path.join(folder, "model.safetensors"))
        state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(), "num_processes": accelerator.num_processes}
        if ema is not None:
            _save(_tensors(ema.shadow), None, os.path.join(folder, "ema.safetensors"))
            state["ema"] = {"decay": ema.decay, "num_updates": ema.num_updates}
        with open(os.path.join(folder, STATE), "w") as f:
            json.dump(state, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # last: its presence marks a complete checkpoint
        files = sorted(f for f in os.listdir(folder) if f != MANIFEST)
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump({"format": "hart-training-checkpoint/1", "step": step,
                       "sha256": {name: _sha256(os.path.join(folder, name)) for name in files}}, f, indent=2)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ load
@dataclass
class Checkpoint:
    """A verified checkpoint folder; read its parts with the methods below."""

    folder: str
    manifest: dict

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def tensors(self, name: str) -> Dict[str, torch.Tensor]:
        try:
            return load_file(self.path(name))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"Checkpoint file {self.path(name)} cannot be read as safetensors: {e}") from e

    def tensors_and_meta(self, name: str):
        tensors = self.tensors(name)
        try:
            with safe_open(self.path(name), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["json"])
        except (KeyError, json.JSONDecodeError, SafetensorError) as e:
            raise CheckpointError(f"Checkpoint file {self.path(name)} has no valid JSON metadata: {e}") from e
        return tensors, meta

    def state(self) -> dict:
        return self.manifest["trainer_state"]

    def has(self, name: str) -> bool:
        return name in self.manifest["sha256"]

    def rank_file(self, kind: str, rank: int) -> str:
        name = f"{kind}_{rank}.safetensors"
        if not self.has(name):
            raise CheckpointError(
                f"Checkpoint {self.folder} has no {name}: it was written by {self.state()['num_processes']} "
                "process(es); resume with the same number of processes."
            )
        return name


def read_checkpoint(folder: str) -> Checkpoint:
    """Verify a checkpoint folder (manifest present, every file present and unmodified) before any use."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"Checkpoint folder {folder} does not exist.")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"Checkpoint {folder} is incomplete or not a HART checkpoint: {manifest_path} is missing.")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        hashes = dict(manifest["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"Checkpoint file {manifest_path} is not a valid manifest: {e}") from e
    for name, expected in hashes.items():
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or not name.endswith((".safetensors", ".json")):
            raise CheckpointError(f"Checkpoint file {manifest_path} lists an unexpected file {name!r}.")
        if not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint file {path} is missing.")
        if _sha256(path) != expected:
            raise CheckpointError(f"Checkpoint file {path} was modified or truncated (SHA-256 differs from {MANIFEST}).")
    if STATE not in hashes or "model.safetensors" not in hashes:
        raise CheckpointError(f"Checkpoint {folder} lacks {STATE} or model.safetensors.")
    try:
        with open(os.path.join(folder, STATE)) as f:
            manifest["trainer_state"] = json.load(f)
        int(manifest["trainer_state"]["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Checkpoint file {os.path.join(folder, STATE)} is not valid: {e}") from e
    return Checkpoint(folder, manifest)


def load_model_state(checkpoint: Checkpoint, module: torch.nn.Module, trained_only: bool) -> None:
    """Load ``model.safetensors`` into the (unprepared) module; with ``trained_only`` it holds a subset."""
    state = checkpoint.tensors("model.safetensors")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (missing and not trained_only) or (trained_only and not state):
        raise CheckpointError(
            f"Checkpoint file {checkpoint.path('model.safetensors')} does not fit this model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); were the model options changed?"
        )


def load_training_state(checkpoint: Checkpoint, accelerator, optimizer, lr_scheduler, ema=None) -> int:
    """Restore optimizer, LR schedule, EMA and RNG states of this process; returns the step."""
    state = checkpoint.state()
    rank = accelerator.process_index
    name = checkpoint.rank_file("optimizer", rank)
    try:
        optimizer.load_state_dict(optimizer_from_safetensors(*checkpoint.tensors_and_meta(name)))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"Checkpoint file {checkpoint.path(name)} does not fit this optimizer: {e}") from e
    if ema is not None:
        if not checkpoint.has("ema.safetensors"):
            raise CheckpointError(f"Checkpoint {checkpoint.folder} has no ema.safetensors but EMA is on.")
        ema.load(checkpoint.tensors("ema.safetensors"), **state["ema"])
    rng_from_safetensors(*checkpoint.tensors_and_meta(checkpoint.rank_file("rng", rank)))
    return int(state["step"])


__all__ = ["Checkpoint", "CheckpointError", "load_model_state", "load_training_state", "read_checkpoint",
           "save_checkpoint"]
