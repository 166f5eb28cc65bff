"""Model cards for HART pipeline folders and LoRA adapters (README.md with Hub metadata), and uploads."""

import os
from typing import List, Optional, Sequence

import yaml

CARD_TEMPLATE = """---
{front_matter}---

# {title}

{description}

HART (Hybrid Autoregressive Transformer, [arXiv 2410.10812](https://arxiv.org/abs/2410.10812)) generates
images with a next-scale autoregressive transformer over the discrete tokens of a hybrid tokenizer and a
small residual diffusion head for the continuous detail.

## Usage

```python
import torch
from hart_pipeline import HARTPipeline

pipe = HARTPipeline.from_pretrained("{repo_id}", dtype=torch.{dtype})
image = pipe("{example_prompt}", generator=torch.Generator().manual_seed(0)).images[0]
image.save("image.png")
```

Without the `hart_pipeline` package, the code this folder carries runs it:
`DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)`.

Generated images are {size}x{size}.
"""


def model_card(title: str, description: str, repo_id: str, size: int, license: str = "mit",
               base_model: Optional[str] = None, dtype: str = "bfloat16",
               example_prompt: str = "a lemur in a magician hat", extra: str = "") -> str:
    """A README.md with YAML front matter the Hub reads (library, pipeline tag, license, tags)."""
    meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "license": license,
            "tags": ["hart", "autoregressive", "text-to-image"]}
    if base_model:
        meta["base_model"] = base_model
    card = CARD_TEMPLATE.format(front_matter=yaml.safe_dump(meta, sort_keys=False), title=title, description=description,
                                repo_id=repo_id, dtype=dtype, example_prompt=example_prompt, size=size)
    return card + ("\n" + extra.strip() + "\n" if extra else "")


def write_model_card(folder: str, **kwargs) -> str:
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(model_card(**kwargs))
    return path


LORA_CARD_TEMPLATE = """---
{front_matter}---

# HART LoRA: {title}

LoRA adapters (rank {rank}, alpha {alpha}) for a HART pipeline, trained {steps} steps with
`hart_pipeline.training.train_transformer --lora_rank {rank}` on the transformer linears {targets}
{head}.

## Usage

```python
import torch
from hart_pipeline import HARTPipeline

{load_base}
pipe.load_lora_weights("{repo_id}")
image = pipe("{example_prompt}", generator=torch.Generator().manual_seed(0)).images[0]
```

`pipe.fuse_lora()` merges the adapters into the weights, `pipe.unload_lora_weights()` removes them,
`pipe.set_adapters([...], adapter_weights=[...])` combines several.
"""


def write_lora_model_card(folder: str, base_model: str, rank: int, alpha: float, targets: Sequence[str],
                          head_targets: Sequence[str], steps: int, repo_id: str,
                          example_prompt: str = "a red circle above a blue square") -> str:
    """README.md for a LoRA folder (``pytorch_lora_weights.safetensors``) with the Hub's LoRA metadata."""
    meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "license": "mit",
            "tags": ["hart", "lora", "text-to-image"]}
    head = (f"and the residual-head linears {list(head_targets)}" if head_targets else "(residual head frozen)")
    if base_model == "default":  # the package's built-in model
        load_base = "from hart_pipeline.default_model import load_default_pipeline\n\npipe = load_default_pipeline()"
    else:
        meta["base_model"] = str(base_model)
        load_base = f'pipe = HARTPipeline.from_pretrained("{base_model}")'
    card = LORA_CARD_TEMPLATE.format(front_matter=yaml.safe_dump(meta, sort_keys=False), title=os.path.basename(
        os.path.normpath(repo_id)), rank=rank, alpha=alpha, steps=steps, targets=list(targets), head=head,
        load_base=load_base, repo_id=repo_id, example_prompt=example_prompt)
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(card)
    return path


def push_folder(folder: str, repo_id: str, allow_patterns: Optional[List[str]] = None) -> str:
    """Create the Hub model repo ``repo_id`` if needed and upload ``folder`` (only ``allow_patterns``)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=allow_patterns,
                  commit_message="Upload HART LoRA")
    return repo_id
