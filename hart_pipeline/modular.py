"""HART's stages as Modular Diffusers blocks: text encoding, the AR loop over scales, the residual loop,
decoding. Each block calls the same function as :class:`~hart_pipeline.HARTPipeline` (same seed, same
image); :class:`HARTBlocks` chains them.

    hart = HARTPipeline.from_pretrained(folder)
    pipe = HARTBlocks().init_pipeline()
    pipe.update_components(**hart.components, use_system_prompt=hart.config.use_system_prompt)
    image = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), output="images")[0]
"""

import os
from typing import List

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from diffusers.modular_pipelines import ModularPipelineBlocks, PipelineState, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, ConfigSpec, InputParam, OutputParam

from .models.residual_head import HARTResidualHead
from .models.tokenizer import HARTHybridTokenizer
from .models.transformer import HARTTransformer
from .pipeline_hart import OUTPUT_TYPES, SYSTEM_PROMPT, encode_prompt_embeds
from .sampling import HARTTokens, add_residual, decode_tokens, generate_tokens
from .scheduler import HARTResidualScheduler

GENERATOR = InputParam("generator", description="one torch.Generator for every random draw of the call")


class HARTTextEncoderStep(ModularPipelineBlocks):
    model_name = "hart"

    @property
    def description(self) -> str:
        return "Encodes the prompts to HART's text condition (hidden states and position ids)."

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [ComponentSpec("text_encoder"), ComponentSpec("tokenizer"), ComponentSpec("transformer", HARTTransformer)]

    @property
    def expected_configs(self) -> List[ConfigSpec]:
        return [ConfigSpec("use_system_prompt", True)]

    @property
    def inputs(self) -> List[InputParam]:
        return [
            InputParam("prompt", required=True),
            InputParam("negative_prompt", description="default: the official all-zero unconditional condition"),
            InputParam("num_images_per_prompt", type_hint=int, default=1),
            InputParam("max_sequence_length", type_hint=int, description="default: the transformer's context_tokens"),
        ]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam(name, type_hint=torch.Tensor) for name in
                ("prompt_embeds", "prompt_position_ids", "negative_prompt_embeds", "negative_position_ids")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block = self.get_block_state(state)
        use_system_prompt = getattr(components.config, "use_system_prompt", True)  # the official default
        (block.prompt_embeds, block.prompt_position_ids, block.negative_prompt_embeds,
         block.negative_position_ids) = encode_prompt_embeds(
            components.tokenizer, components.text_encoder, block.prompt, block.negative_prompt,
            block.num_images_per_prompt, components._execution_device,
            block.max_sequence_length or components.transformer.config.context_tokens,
            SYSTEM_PROMPT if use_system_prompt else None,
        )
        self.set_block_state(state, block)
        return components, state


class HARTAutoregressiveStep(ModularPipelineBlocks):
    model_name = "hart"

    @property
    def description(self) -> str:
        return "The AR loop: every scale's discrete tokens, coarse to fine, with classifier-free guidance."

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [ComponentSpec("transformer", HARTTransformer), ComponentSpec("vae", HARTHybridTokenizer)]

    @property
    def inputs(self) -> List[InputParam]:
        return [
            InputParam("prompt_embeds", required=True, type_hint=torch.Tensor),
            InputParam("prompt_position_ids", required=True, type_hint=torch.Tensor),
            InputParam("negative_prompt_embeds", type_hint=torch.Tensor),
            InputParam("negative_position_ids", type_hint=torch.Tensor),
            InputParam("patch_nums", description="patch schedule; default the transformer's"),
            InputParam("guidance_scale", type_hint=float, default=4.5),
            InputParam("top_k", type_hint=int, description="None: the official 600/300 schedule"),
            InputParam("top_p", type_hint=float, default=0.0),
            InputParam("smooth", type_hint=bool, default=True),
            GENERATOR,
        ]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("tokens", type_hint=HARTTokens, description="hybrid tokens without the residual")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block = self.get_block_state(state)
        block.tokens = generate_tokens(
            components.transformer, components.vae, block.prompt_embeds, block.prompt_position_ids,
            block.negative_prompt_embeds, block.negative_position_ids, patch_nums=block.patch_nums,
            guidance_scale=block.guidance_scale, top_k=block.top_k, top_p=block.top_p, smooth=block.smooth,
            generator=block.generator,
        )
        self.set_block_state(state, block)
        return components, state


class HARTResidualStep(ModularPipelineBlocks):
    model_name = "hart"

    @property
    def description(self) -> str:
        return "The residual loop: diffusion of the continuous residual of the final scale."

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [ComponentSpec("residual_head", HARTResidualHead),
                ComponentSpec("scheduler", HARTResidualScheduler)]

    @property
    def inputs(self) -> List[InputParam]:
        return [InputParam("tokens", required=True, type_hint=HARTTokens),
                InputParam("num_inference_steps", type_hint=int, default=8),
                InputParam("residual_guidance_scale", type_hint=float, default=None,
                           description="None: the scheduler's guidance_scale, else the final-scale guidance (official)"),
                GENERATOR]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("tokens", type_hint=HARTTokens, description="hybrid tokens with the residual")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block = self.get_block_state(state)
        block.tokens = add_residual(block.tokens, components.residual_head, components.scheduler,
                                    block.num_inference_steps, guidance_scale=block.residual_guidance_scale,
                                    generator=block.generator)
        self.set_block_state(state, block)
        return components, state


class HARTDecodeStep(ModularPipelineBlocks):
    model_name = "hart"

    @property
    def description(self) -> str:
        return "Decodes the hybrid tokens to images with the hybrid tokenizer."

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [ComponentSpec("vae", HARTHybridTokenizer),
                ComponentSpec("image_processor", VaeImageProcessor, config=FrozenDict({"vae_scale_factor": 16}),
                              default_creation_method="from_config")]

    @property
    def inputs(self) -> List[InputParam]:
        return [InputParam("tokens", required=True, type_hint=HARTTokens),
                InputParam("output_type", default="pil", description=f"one of {OUTPUT_TYPES}")]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("images", description="PIL images, np array, tensor, or the tokens (\"latent\")")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block = self.get_block_state(state)
        if block.output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {block.output_type!r}.")
        if block.output_type == "latent":
            block.images = block.tokens
        else:
            images = decode_tokens(components.vae, block.tokens).float()  # [0, 1]
            block.images = components.image_processor.postprocess(images, block.output_type,
                                                                  do_denormalize=[False] * len(images))
        self.set_block_state(state, block)
        return components, state


class HARTBlocks(SequentialPipelineBlocks):
    """Text-to-image: text encoding -> AR loop -> residual loop -> decoding.

    ``save_pretrained(folder)`` writes the blocks as Hub custom blocks: ``modular_config.json`` (its ``auto_map``
    names ``modular_hart.HARTBlocks``) and ``modular_hart.py``, the package's inference code bundled in one file
    (see :mod:`hart_pipeline.remote_code`), so ``ModularPipelineBlocks.from_pretrained(folder_or_repo,
    trust_remote_code=True)`` works where this package is not installed. Saved beside a pipeline's components,
    the folder is a whole Modular repo: ``ModularPipeline.from_pretrained(folder, trust_remote_code=True)``
    then ``load_components()``.
    """

    block_classes = [HARTTextEncoderStep, HARTAutoregressiveStep, HARTResidualStep, HARTDecodeStep]
    block_names = ["text_encoder", "autoregressive", "residual", "decode"]

    @property
    def description(self) -> str:
        return "HART text-to-image: " + " -> ".join(self.block_names)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        from .remote_code import MODULAR_FILE, bundle_source

        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, MODULAR_FILE + ".py"), "w") as f:
            f.write(bundle_source())
        self.register_to_config(auto_map={"ModularPipelineBlocks": f"{MODULAR_FILE}.{type(self).__name__}"})
        self.save_config(save_directory=save_directory, push_to_hub=push_to_hub, **kwargs)


__all__ = ["HARTAutoregressiveStep", "HARTBlocks", "HARTDecodeStep", "HARTResidualStep", "HARTTextEncoderStep"]
