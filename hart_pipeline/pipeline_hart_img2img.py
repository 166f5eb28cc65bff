"""``HARTImg2ImgPipeline``: variations of an image by teacher forcing its coarse scales.

HART predicts an image scale by scale, so the first scales can be taken from a real image (its hybrid
tokens) instead of sampled: the layout and colours stay, the detail is re-sampled under the prompt.
``strength`` chooses how many scales are re-sampled (see :func:`~hart_pipeline.sampling.kept_scales`).
"""

from typing import List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch

from .pipeline_hart import HARTPipeline, HARTPipelineOutput
from .sampling import add_residual, decode_tokens, edit_tokens, encode_images
from .validation import check_finite_output

PipelineImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray],
                           List[torch.Tensor]]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from hart_pipeline import HARTPipeline, HARTImg2ImgPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-0.7b-1024px-diffusers", dtype=torch.bfloat16).to("cuda")
        >>> img2img = HARTImg2ImgPipeline.from_pipe(pipe)  # same components, no reload
        >>> image = Image.open("photo.png").convert("RGB").resize((1024, 1024))
        >>> out = img2img("a watercolor painting", image=image, strength=0.6, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("variation.png")
        ```
"""


class HARTImg2ImgPipeline(HARTPipeline):
    r"""Image-to-image (variations) with HART: keep an image's coarse scales, re-sample the fine ones.

    Same components as :class:`HARTPipeline` (share them with ``HARTImg2ImgPipeline.from_pipe(pipe)``).
    ``strength`` s re-samples the last ``int(s * SN)`` of the SN scales, the residual with the final scale:
    0 returns the image's own reconstruction, 1 is plain text-to-image with the same seed.
    """

    def prepare_image(self, image: PipelineImageInput, height: Optional[int], width: Optional[int]) -> torch.Tensor:
        """Any diffusers image input -> (N, 3, S, S) in [0, 1] at a supported size.

        Without ``height``/``width`` the image keeps its own size, which must be a supported square size.
        """
        if image is None:
            raise ValueError("`image` is required: a PIL image, a numpy array or a tensor (or a list of them).")
        if height is None and width is None:
            height, width = self.image_processor.get_default_height_width(image)
            sizes = self.supported_sizes
            if height != width or height not in sizes:
                valid = ", ".join(f"{s}x{s}" for s in sorted(sizes))
                raise ValueError(f"`image` is {width}x{height}; HART edits square images of {valid}. Resize or crop "
                                 "it, or pass height= and width= to resize it.")
        height, width = height or width, width or height
        self.patch_nums_for_size(height, width)
        images = self.image_processor.preprocess(image, height=height, width=width)  # [-1, 1]
        return ((images + 1) / 2).clamp(0, 1).to(self._execution_device)

    def _edit(
        self,
        prompt,
        originals: torch.Tensor,
        mask: Optional[torch.Tensor],
        strength: float,
        negative_prompt,
        num_inference_steps: int,
        guidance_scale: float,
        top_k: Optional[int],
        top_p: float,
        smooth: bool,
        num_maskgit_iters: int,
        residual_guidance_scale: Optional[float],
        num_images_per_prompt: int,
        generator,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        output_type: str,
        return_dict: bool,
        max_sequence_length: Optional[int],
        blend_original: bool = False,
    ):
        """Shared by image-to-image and inpainting: encode the images (N, 3, S, S) in [0, 1], teacher-force what
        is kept (outside ``mask`` (N, 1, S, S), 1 = repaint, and the first scales), sample the rest."""
        side = originals.shape[-1]
        checked = self.check_inputs(
            prompt, negative_prompt, side, side, num_inference_steps, guidance_scale, top_k, top_p,
            num_images_per_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds, output_type, None,
            negative_prompt_attention_mask, generator, smooth, return_dict, None, max_sequence_length,
            residual_guidance_scale)
        (num_inference_steps, guidance_scale, top_k, top_p, num_images_per_prompt, generator,
         max_sequence_length, residual_guidance_scale) = checked[2:]
        device = self._execution_device
        embeds, positions, neg_embeds, neg_positions = self.encode_prompt(
            prompt, negative_prompt, num_images_per_prompt, device, prompt_embeds, prompt_attention_mask,
            negative_prompt_embeds, negative_prompt_attention_mask, max_sequence_length,
        )
        B = embeds.shape[0]
        if originals.shape[0] not in (1, B):
            raise ValueError(f"`image` holds {originals.shape[0]} images for {B} outputs (prompts x "
                             "num_images_per_prompt); pass one image or one per output.")
        patch_nums = self.patch_nums_for_size(side, side)
        image_tokens = encode_images(self.vae, originals.to(self.vae.dtype), patch_nums)

        num_scales = len(patch_nums)
        with self.progress_bar(total=num_scales + num_inference_steps * max(1, int(num_maskgit_iters))) as progress:
            def tick(*_) -> None:  # returns None: the stages' callbacks may replace what a callback returns
                progress.update()

            tokens = edit_tokens(
                self.transformer, self.vae, image_tokens, embeds, positions, strength=strength, repaint_mask=mask,
                negative_context=neg_embeds, negative_position_ids=neg_positions, guidance_scale=guidance_scale,
                top_k=top_k, top_p=top_p, smooth=smooth, generator=generator, num_maskgit_iters=num_maskgit_iters,
                callback=tick,
            )
            tokens = add_residual(tokens, self.residual_head, self.scheduler, num_inference_steps,
                                  guidance_scale=residual_guidance_scale, generator=generator, callback=tick)

        if output_type == "latent":
            images = tokens
        else:
            images = check_finite_output("images", decode_tokens(self.vae, tokens).float())  # [0, 1]
            if blend_original and mask is not None:
                images = mask * images + (1 - mask) * originals.float()
            images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return HARTPipelineOutput(images=images)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        image: PipelineImageInput = None,
        strength: float = 0.8,
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
        r"""Make variations of ``image`` under ``prompt``.

        Args:
            image: the image(s) to vary: PIL, numpy (H, W, 3) / (N, H, W, 3) in [0, 1], or tensors
                (N, 3, H, W) in [0, 1] (diffusers' image processor conventions); one for all outputs or one
                per output.
            strength: in [0, 1]; the last ``int(strength * SN)`` scales are re-sampled (SN = the number of
                scales, 14 at 1024px): 0 = the image's reconstruction, 1 = text-to-image (same seed, same
                image as ``HARTPipeline``).
            height, width: resize the image to this supported square size; default: the image's own size.
            The other arguments are those of :meth:`HARTPipeline.__call__` (``num_maskgit_iters`` and
            ``residual_guidance_scale`` included).

        Examples:
        """
        return self._edit(prompt, self.prepare_image(image, height, width), None, strength, negative_prompt, num_inference_steps,
                          guidance_scale, top_k, top_p, smooth, num_maskgit_iters, residual_guidance_scale,
                          num_images_per_prompt, generator,
                          prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask,
                          output_type, return_dict, max_sequence_length)


HARTImg2ImgPipeline.__call__.__doc__ = HARTImg2ImgPipeline.__call__.__doc__.replace("        Examples:\n", EXAMPLE_DOC_STRING)

__all__ = ["HARTImg2ImgPipeline", "PipelineImageInput"]
