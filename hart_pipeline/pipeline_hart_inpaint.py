"""``HARTInpaintPipeline``: repaint the masked part of an image; outpainting on a padded canvas.

Outside the mask every scale's tokens are the image's (teacher forcing) and the continuous residual is the
image's own; inside, tokens are sampled under the prompt at every scale (after the first scales kept by
``strength``) and the residual is re-sampled.
"""

from typing import List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .models.residual_head import HARTResidualHead
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .pipeline_hart import HARTPipelineOutput
from .pipeline_hart_img2img import HARTImg2ImgPipeline, PipelineImageInput
from .scheduler import HARTResidualScheduler

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from hart_pipeline import HARTPipeline, HARTInpaintPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-0.7b-1024px-diffusers", dtype=torch.bfloat16).to("cuda")
        >>> inpaint = HARTInpaintPipeline.from_pipe(pipe)
        >>> image = Image.open("photo.png").convert("RGB").resize((1024, 1024))
        >>> mask = Image.open("mask.png").convert("L").resize((1024, 1024))  # white = repaint
        >>> out = inpaint("a red balloon", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("inpainted.png")
        ```
"""


def outpaint_canvas(image: PIL.Image.Image, size: int, left: Optional[int] = None, top: Optional[int] = None,
                    fill: Union[str, Tuple[int, int, int]] = "edge") -> Tuple[PIL.Image.Image, PIL.Image.Image]:
    """Place ``image`` on a ``size`` x ``size`` canvas for outpainting: returns (canvas, mask), white = paint.

    ``left``/``top`` default to centring the image, which must fit. ``fill`` = "edge" extends the image's
    border pixels outwards, so the coarse scales (which the prompt alone cannot know) start from the image's
    colours; or an RGB colour.
    """
    width, height = image.size
    left = (size - width) // 2 if left is None else left
    top = (size - height) // 2 if top is None else top
    if left < 0 or top < 0 or left + width > size or top + height > size:
        raise ValueError(f"A {width}x{height} image at ({left}, {top}) does not fit on a {size}x{size} canvas.")
    pixels = np.asarray(image.convert("RGB"))
    if fill == "edge":
        pad = ((top, size - top - height), (left, size - left - width), (0, 0))
        canvas = PIL.Image.fromarray(np.pad(pixels, pad, mode="edge"))
    else:
        canvas = PIL.Image.new("RGB", (size, size), tuple(fill))
        canvas.paste(PIL.Image.fromarray(pixels), (left, top))
    mask = PIL.Image.new("L", (size, size), 255)
    mask.paste(0, (left, top, left + width, top + height))
    return canvas, mask


class HARTInpaintPipeline(HARTImg2ImgPipeline):
    r"""Inpainting (and outpainting) with HART by masked teacher forcing.

    Same components as :class:`HARTPipeline` (``HARTInpaintPipeline.from_pipe(pipe)`` shares them). The mask
    is resized to every scale's token grid (a token is repainted when at least half of it is masked, at the
    final scale when any of it is); tokens outside are the image's at every scale, tokens inside are
    sampled; the residual is re-sampled inside only. An empty mask returns the image's reconstruction, a
    full mask with ``strength=1`` is text-to-image with the same seed.
    """

    def __init__(self, tokenizer, text_encoder, vae: HARTHybridTokenizer, transformer: HARTTransformer,
                 residual_head: HARTResidualHead, scheduler: HARTResidualScheduler, use_system_prompt: bool = True):
        super().__init__(tokenizer, text_encoder, vae, transformer, residual_head, scheduler, use_system_prompt)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=vae.downsample_factor if vae is not None else 16,
                                                do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    def prepare_mask(self, mask_image: PipelineImageInput, images: torch.Tensor,
                     image_size: Tuple[int, int]) -> torch.Tensor:
        """Any diffusers mask input (white / 1 = repaint) -> binary (N, 1, S, S) float at the size of ``images``.

        The mask must have the size of the image as given (``image_size``, (H, W)) or as prepared.
        """
        if mask_image is None:
            raise ValueError("`mask_image` is required (white = repaint); for whole-image variations use "
                             "HARTImg2ImgPipeline.")
        if not isinstance(mask_image, (PIL.Image.Image, np.ndarray, torch.Tensor, list)):
            raise ValueError(f"`mask_image` must be a PIL image, a numpy array or a tensor (or a list of them); "
                             f"got {type(mask_image).__name__}.")
        side = images.shape[-1]
        first = mask_image[0] if isinstance(mask_image, list) and mask_image else mask_image
        if isinstance(first, PIL.Image.Image):
            mask_size = first.size[::-1]
        elif isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim >= 2:
            shape = tuple(first.shape)
            # numpy masks: (H, W), (H, W, 1) or (N, H, W, 1); tensors: (H, W), (1, H, W) or (N, 1, H, W)
            mask_size = shape[-3:-1] if isinstance(first, np.ndarray) and len(shape) >= 3 and shape[-1] == 1 else shape[-2:]
        else:
            raise ValueError(f"`mask_image` must be a 2D mask (H, W) or a batch of them; got {type(first).__name__} "
                             f"with shape {getattr(first, 'shape', None)}.")
        if tuple(mask_size) not in ((side, side), tuple(image_size)):
            raise ValueError(f"`mask_image` is {mask_size[-1]}x{mask_size[0]} but the image is "
                             f"{image_size[1]}x{image_size[0]}; pass a mask of the image's size.")
        return self.mask_processor.preprocess(mask_image, height=side, width=side).to(images.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        strength: float = 1.0,
        blend_original: bool = False,
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 8,
        guidance_scale: float = 4.5,
        top_k: Optional[int] = None,
        top_p: float = 0.0,
        smooth: bool = True,
        num_maskgit_iters: int = 1,
        residual_guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: Optional[int] = None,
    ) -> Union[HARTPipelineOutput, Tuple]:
        r"""Repaint the white part of ``mask_image`` in ``image`` under ``prompt``.

        Args:
            image: as :class:`HARTImg2ImgPipeline` (PIL, numpy or tensors in [0, 1]; a supported square size,
                or pass height/width to resize).
            mask_image: same size as ``image``; white (1) = repaint, black (0) = keep; PIL ("L" or RGB), numpy
                (H, W) / (N, H, W, 1) or tensors (H, W) / (N, 1, H, W) in [0, 1], binarised at 0.5.
            strength: in [0, 1]; inside the mask the last ``int(strength * SN)`` scales are sampled, the first
                ones kept from the image (1 = repaint from scratch, official-like; 0 = the reconstruction).
            blend_original: paste the original pixels back outside the mask after decoding (the decoder
                spreads every token over its neighbours, so the outside otherwise changes slightly near it).
            The other arguments are those of :meth:`HARTPipeline.__call__`.

        Examples:
        """
        originals = self.prepare_image(image, height, width)
        mask = self.prepare_mask(mask_image, originals, self.image_processor.get_default_height_width(image))
        return self._edit(prompt, originals, mask, strength, negative_prompt, num_inference_steps, guidance_scale,
                          top_k, top_p, smooth, num_maskgit_iters, residual_guidance_scale, num_images_per_prompt,
                          generator, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                          negative_prompt_attention_mask, output_type, return_dict, max_sequence_length,
                          blend_original=blend_original)


HARTInpaintPipeline.__call__.__doc__ = HARTInpaintPipeline.__call__.__doc__.replace("        Examples:\n", EXAMPLE_DOC_STRING)

__all__ = ["HARTInpaintPipeline", "outpaint_canvas"]
