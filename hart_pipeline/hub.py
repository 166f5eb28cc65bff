"""Model cards for HART pipeline folders (README.md with Hub metadata)."""

import os
from typing import Optional

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
