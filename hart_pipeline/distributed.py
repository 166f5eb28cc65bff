"""Generation over several processes: ``hart generate --prompts FILE --out-dir DIR`` under ``accelerate launch``.

Prompt ``i`` (0-based line of the file, empty lines skipped) is generated with the seed ``seed + i`` and
saved as ``DIR/{i:05d}.png``, whichever process draws it: the processes split the prompts, and the
images are, file for file, those one process writes.
"""

import json
import os
from typing import Any, List

import torch


def read_prompts(path: str) -> List[str]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {path} holds no prompt (one prompt per line).")
    return prompts


def generate_from_file(pipe, prompts_file: str, out_dir: str, seed: int = 0, **call_kwargs: Any) -> List[str]:
    """Generate one image per prompt of ``prompts_file`` into ``out_dir``, this process's share of them.

    ``call_kwargs`` go to the pipeline call (``height``, ``num_inference_steps``, ``guidance_scale``...).
    The main process also writes ``out_dir/prompts.json`` (file -> prompt, seed). Returns the paths this
    process wrote.
    """
    from accelerate import PartialState

    state = PartialState()
    prompts = read_prompts(prompts_file)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with state.split_between_processes(list(range(len(prompts)))) as mine:
        for i in mine:
            generator = torch.Generator().manual_seed(seed + i)
            image = pipe(prompts[i], generator=generator, **call_kwargs).images[0]
            path = os.path.join(out_dir, f"{i:05d}.png")
            image.save(path)
            written.append(path)
    if state.is_main_process:
        with open(os.path.join(out_dir, "prompts.json"), "w") as f:
            json.dump([{"file": f"{i:05d}.png", "prompt": p, "seed": seed + i} for i, p in enumerate(prompts)], f,
                      indent=1)
    state.wait_for_everyone()
    return written


__all__ = ["generate_from_file", "read_prompts"]
