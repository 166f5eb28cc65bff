"""HART (Hybrid Autoregressive Transformer) as native diffusers components."""

from .models import HARTHybridTokenizer, HARTResidualHead, HARTTransformer, HybridTokens
from .modular import HARTAutoregressiveStep, HARTBlocks, HARTDecodeStep, HARTResidualStep, HARTTextEncoderStep
from .pipeline_hart import HARTPipeline, HARTPipelineOutput
from .pipeline_hart_img2img import HARTImg2ImgPipeline
from .pipeline_hart_inpaint import HARTInpaintPipeline, outpaint_canvas
from .sampling import HARTTokens, add_residual, decode_tokens, edit_tokens, encode_images, generate_tokens, sample_residual
from .scheduler import HARTResidualScheduler
from .schedules import PATCH_NUMS, patch_nums_for_resolution

__version__ = "0.1.0"

if __name__ == "hart_pipeline":  # not in a folder's bundled copy (remote_code.py)
    import diffusers

    # `DiffusionPipeline.from_pretrained` resolves a string `_class_name` in diffusers' namespace: after
    # `import hart_pipeline` it finds folders whose index names "HARTPipeline" (e.g. the built-in model).
    diffusers.HARTPipeline = HARTPipeline

__all__ = [
    "PATCH_NUMS",
    "HARTAutoregressiveStep",
    "HARTBlocks",
    "HARTDecodeStep",
    "HARTHybridTokenizer",
    "HARTImg2ImgPipeline",
    "HARTInpaintPipeline",
    "HARTPipeline",
    "HARTPipelineOutput",
    "HARTResidualHead",
    "HARTResidualScheduler",
    "HARTResidualStep",
    "HARTTextEncoderStep",
    "HARTTokens",
    "HARTTransformer",
    "HybridTokens",
    "add_residual",
    "decode_tokens",
    "edit_tokens",
    "encode_images",
    "generate_tokens",
    "outpaint_canvas",
    "patch_nums_for_resolution",
    "sample_residual",
]
