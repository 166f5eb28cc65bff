"""HART (Hybrid Autoregressive Transformer) as native diffusers components.

The names below are imported on first use (PEP 562), as diffusers does for its own: ``import hart_pipeline``
and the ``hart`` command's argument parsing stay quick, and torch / diffusers load only when a class is used.
"""

import importlib
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    ".models": ("HARTHybridTokenizer", "HARTResidualHead", "HARTTransformer", "HybridTokens"),
    ".modular": ("HARTAutoregressiveStep", "HARTBlocks", "HARTDecodeStep", "HARTResidualStep", "HARTTextEncoderStep"),
    ".pipeline_hart": ("HARTPipeline", "HARTPipelineOutput"),
    ".pipeline_hart_img2img": ("HARTImg2ImgPipeline",),
    ".pipeline_hart_inpaint": ("HARTInpaintPipeline", "outpaint_canvas"),
    ".sampling": ("HARTTokens", "add_residual", "decode_tokens", "edit_tokens", "encode_images", "generate_tokens",
                  "sample_residual"),
    ".scheduler": ("HARTResidualScheduler",),
    ".schedules": ("PATCH_NUMS", "patch_nums_for_resolution"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
# `DiffusionPipeline.from_pretrained` resolves a string `_class_name` (e.g. the built-in model's "HARTPipeline")
# in diffusers' namespace; these names are found there once this package is imported
PIPELINES = ("HARTPipeline", "HARTImg2ImgPipeline", "HARTInpaintPipeline")

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from .models import HARTHybridTokenizer, HARTResidualHead, HARTTransformer, HybridTokens  # noqa: F401
    from .modular import (HARTAutoregressiveStep, HARTBlocks, HARTDecodeStep, HARTResidualStep,  # noqa: F401
                          HARTTextEncoderStep)
    from .pipeline_hart import HARTPipeline, HARTPipelineOutput  # noqa: F401
    from .pipeline_hart_img2img import HARTImg2ImgPipeline  # noqa: F401
    from .pipeline_hart_inpaint import HARTInpaintPipeline, outpaint_canvas  # noqa: F401
    from .sampling import (HARTTokens, add_residual, decode_tokens, edit_tokens, encode_images,  # noqa: F401
                           generate_tokens, sample_residual)
    from .scheduler import HARTResidualScheduler  # noqa: F401
    from .schedules import PATCH_NUMS, patch_nums_for_resolution  # noqa: F401


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))


if __name__ == "hart_pipeline":  # not in a folder's bundled copy (remote_code.py)
    from ._diffusers_names import register_pipelines

    register_pipelines(sys.modules[__name__], PIPELINES)
