"""Bad pipeline input: every reproducer of the hardening issue gives a ValueError naming the argument.

Cases that used to end deep inside torch/transformers, or were accepted with a wrong result, each have a
row here; integer-like numpy/torch scalars are accepted where an int is meant.
"""

import numpy as np
import pytest
import torch

from hart_pipeline import HARTPipeline, HARTResidualScheduler
from hart_pipeline.validation import check_device, check_dtype, check_float, check_int


PROMPT = "a red circle above a blue square"
NAN, INF = float("nan"), float("inf")


def _call(pipe, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(generator=kwargs.pop("generator", torch.Generator().manual_seed(0)), **kwargs).images


BAD = [
    # generator of the wrong type
    (dict(generator=0), "`generator`"),
    (dict(generator=[0]), "`generator`"),
    (dict(generator="seed"), "`generator`"),
    # types that used to fail in comparisons or inside torch
    (dict(guidance_scale="4.5"), "`guidance_scale`"),
    (dict(top_k="600"), "`top_k`"),
    (dict(top_p=None), "`top_p`"),
    (dict(num_images_per_prompt="2"), "`num_images_per_prompt`"),
    (dict(num_images_per_prompt=2.5), "`num_images_per_prompt`"),
    (dict(top_k=2.5), "`top_k`"),
    (dict(num_inference_steps=8.0), "`num_inference_steps`"),
    (dict(num_inference_steps=1001), r"`num_inference_steps` must be an integer in \[2, 1000\]"),
    # bools where numbers are meant, tensors where scalars are meant
    (dict(num_inference_steps=True), "`num_inference_steps`"),
    (dict(guidance_scale=True), "`guidance_scale`"),
    (dict(top_k=False), "`top_k`"),
    (dict(guidance_scale=torch.ones(1)), "`guidance_scale`"),
    (dict(smooth="yes"), "`smooth`"),
    (dict(return_dict=1), "`return_dict`"),
    # NaN / inf / negative for every float argument
    (dict(guidance_scale=NAN), "`guidance_scale` must be a finite number"),
    (dict(guidance_scale=INF), "`guidance_scale` must be a finite number"),
    (dict(guidance_scale=-0.5), "`guidance_scale`"),
    (dict(top_p=NAN), "`top_p` must be a finite number"),
    (dict(top_p=-INF), "`top_p` must be a finite number"),
    (dict(top_p=-0.1), "`top_p`"),
    (dict(top_p=1.0), "`top_p`"),
    (dict(top_k=NAN), "`top_k`"),
    (dict(top_k=-1), "`top_k`"),
    # sizes: 0 used to mean the default
    (dict(height=0, width=0), "`height`"),
    (dict(height=64, width=0), "`width`"),
    (dict(height=-64, width=-64), "`height`"),
    (dict(height="64", width="64"), "`height`"),
    # text length
    (dict(max_sequence_length=-1), "`max_sequence_length`"),
    (dict(max_sequence_length=0), "`max_sequence_length`"),
    (dict(max_sequence_length=2.0), "`max_sequence_length`"),
    # prompts
    (dict(prompt=5), "`prompt`"),
    (dict(prompt=[PROMPT, None]), "`prompt`"),
    (dict(negative_prompt=5), "`negative_prompt`"),
    (dict(negative_prompt=[None]), "`negative_prompt`"),
    (dict(negative_prompt=[]), "`negative_prompt`"),
    # callbacks
    (dict(callback_on_step_end=5), "`callback_on_step_end` must be callable"),
    (dict(callback_on_step_end_tensor_inputs=5), "`callback_on_step_end_tensor_inputs`"),
    (dict(callback_on_step_end_tensor_inputs="latents"), "`callback_on_step_end_tensor_inputs`"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "not among"),
    (dict(callback_on_step_end=lambda *a: 1), "must return a dict"),
    (dict(callback_on_step_end=lambda *a: [1]), "must return a dict"),
    (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(1, 16, 2, 2)},
          callback_on_step_end_tensor_inputs=["latents"]), r"it must keep the shape \(1, 16, 4, 4\)"),
    (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": "x"}, callback_on_step_end_tensor_inputs=["latents"]),
     "returned 'latents'"),
    (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * NAN},
          callback_on_step_end_tensor_inputs=["latents"]), "NaN"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_name_the_argument(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(pipe, **kwargs)


def _embeds(pipe, batch=1, tokens=8):
    return torch.randn(batch, tokens, pipe.transformer.config.context_dim, generator=torch.Generator().manual_seed(1))


BAD_EMBEDS = [
    (dict(prompt_embeds="numpy"), "`prompt_embeds` must be a torch.Tensor"),
    (dict(prompt_embeds="list"), "`prompt_embeds` must be a torch.Tensor"),
    (dict(prompt_embeds="empty"), "`prompt_embeds` must have 3 non-empty dimensions"),
    (dict(prompt_embeds="nan"), "`prompt_embeds` contains NaN"),
    (dict(prompt_embeds="int"), "`prompt_embeds` must be a floating-point tensor"),
    (dict(negative_prompt_embeds="16 tokens"), r"`negative_prompt_embeds` must be \(1, 8, 32\)"),
    (dict(negative_prompt_embeds="16 tokens", with_prompt=True), r"`negative_prompt_embeds` must be \(1, 8, 32\)"),
    (dict(negative_prompt_embeds="ok", negative_prompt_attention_mask="3 tokens"),
     "`negative_prompt_attention_mask` must have shape"),
    (dict(negative_prompt_attention_mask="3 tokens"), "only used with `negative_prompt_embeds`"),
    (dict(prompt_attention_mask="values"), "must hold only 0"),
    (dict(prompt_attention_mask="zeros"), "a row without any token"),
    (dict(prompt_attention_mask="3 tokens"), "`prompt_attention_mask` must have shape"),
]


@pytest.mark.parametrize("case, match", BAD_EMBEDS, ids=[str(i) for i in range(len(BAD_EMBEDS))])
def test_bad_embeddings_and_masks(pipe, case, match):
    good = _embeds(pipe)
    values = {
        "numpy": good.numpy(), "list": good.tolist(), "empty": good[:, :0], "nan": good * NAN, "int": good.long(),
        "16 tokens": _embeds(pipe, tokens=16), "ok": good, "3 tokens": torch.ones(1, 3, dtype=torch.long),
        "values": torch.full((1, 8), 2), "zeros": torch.zeros(1, 8, dtype=torch.long),
    }
    kwargs = {k: values[v] for k, v in case.items() if k != "with_prompt"}
    if case.get("with_prompt"):
        kwargs["prompt"] = PROMPT  # text prompts are padded to max_sequence_length (8 tokens here)
    else:
        kwargs["prompt"] = None
        kwargs.setdefault("prompt_embeds", good)
    with pytest.raises(ValueError, match=match):
        _call(pipe, **kwargs)


def test_integer_like_scalars_are_accepted_and_give_the_same_image(pipe):
    reference = _call(pipe, output_type="np", num_inference_steps=2, top_k=5, num_images_per_prompt=1, height=64)
    same = _call(pipe, output_type="np", num_inference_steps=np.int64(2), top_k=torch.tensor(5),
                 num_images_per_prompt=np.int32(1), height=np.int64(64), width=torch.tensor(64),
                 guidance_scale=np.float32(4.5), top_p=np.float64(0.0))
    assert np.array_equal(reference, same)


def test_callback_may_return_none_or_new_latents(pipe):
    calls = []

    def callback(p, step, timestep, kwargs):
        calls.append(step)
        return None if step % 2 else {"latents": kwargs["latents"].clone()}

    images = _call(pipe, output_type="np", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert calls == list(range(pipe.num_timesteps))  # every scale, then every residual step
    assert pipe.num_timesteps > len(pipe.transformer.config.patch_nums)
    assert np.isfinite(images).all()


def test_max_sequence_length_is_honoured(pipe):
    """Regression: 0 fell back to the default; an explicit length pads the text to that many tokens."""
    embeds, positions, _, _ = pipe.encode_prompt(PROMPT, max_sequence_length=5)
    assert embeds.shape[1] == 5
    with pytest.raises(ValueError, match="`max_sequence_length`"):
        pipe.encode_prompt(PROMPT, max_sequence_length=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only torch")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_on_a_cpu_only_torch(pipe, device):
    with pytest.raises(ValueError, match="has no cuda device; use 'cpu'"):
        pipe.to(device)
    with pytest.raises(ValueError, match="`device`"):
        pipe.encode_prompt(PROMPT, device=device)


@pytest.mark.parametrize("device, match", [("meta", "meta device"), ("gpu", "not a device"), (3.5, "not a device")])
def test_other_bad_devices(pipe, device, match):
    with pytest.raises(ValueError, match=match):
        pipe.to(device)


@pytest.mark.parametrize("dtype", ["bf17", torch.int8, torch.bool, 16, torch.float8_e4m3fn])
def test_unknown_dtype(pipe, dtype, tmp_path):
    with pytest.raises(ValueError, match="`dtype` must be a floating torch dtype"):
        pipe.to(dtype=dtype)
    with pytest.raises(ValueError, match="`torch_dtype` must be a floating torch dtype"):
        HARTPipeline.from_pretrained(tmp_path / "unused", torch_dtype=dtype)


def test_dtype_names_are_accepted():
    assert check_dtype("dtype", "bf16") is torch.bfloat16 and check_dtype("dtype", "torch.float16") is torch.float16
    assert check_device("device", "cpu") == torch.device("cpu")


def test_foreign_scheduler_and_swapped_components(pipe):
    from diffusers import DDPMScheduler

    parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, transformer=pipe.transformer,
                 residual_head=pipe.residual_head, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="`scheduler` must be a HARTResidualScheduler; got a DDPMScheduler"):
        HARTPipeline(**{**parts, "scheduler": DDPMScheduler()})
    with pytest.raises(ValueError, match="`transformer` must be a HARTTransformer; got a HARTResidualHead"):
        HARTPipeline(**{**parts, "transformer": pipe.residual_head})
    with pytest.raises(ValueError, match="`use_system_prompt` must be True or False"):
        HARTPipeline(**parts, use_system_prompt="yes")
    assert isinstance(HARTPipeline(**{**parts, "scheduler": HARTResidualScheduler()}), HARTPipeline)


@pytest.mark.parametrize("check, args, match", [
    (check_int, ("n", 3.0), "must be an integer"),
    (check_int, ("n", np.bool_(True)), "must be an integer"),
    (check_int, ("n", torch.tensor([1, 2])), "must be an integer"),
    (check_int, ("n", 5, 0, 4), r"in \[0, 4\]"),
    (check_float, ("x", "1"), "must be a real number"),
    (check_float, ("x", np.float32("nan")), "finite"),
    (check_float, ("x", 1.0, 0.0, 1.0, True), r"in \[0.0, 1.0\)"),
])
def test_scalar_checkers(check, args, match):
    with pytest.raises(ValueError, match=match):
        check(*args)
    assert check_int("n", np.uint8(3)) == 3 and check_float("x", torch.tensor(2)) == 2.0


@pytest.mark.parametrize("prompt", [3, None, ["a red circle", 2], [], b"a red circle"])
def test_encode_prompt_names_a_prompt_that_is_not_text(prompt):
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="`prompt` must be a string or a non-empty list of strings"):
        pipe.encode_prompt(prompt)
    with pytest.raises(ValueError, match="`negative_prompt` must be a string or a non-empty list of strings"):
        pipe.encode_prompt("a red circle", negative_prompt=7)


def test_cli_refuses_an_empty_device(capsys, tmp_path):
    from hart_pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "--device", "", "--out", str(tmp_path / "never.png")])
    assert exit_info.value.code == 2
    assert "argument --device" in capsys.readouterr().err and not (tmp_path / "never.png").exists()


def test_stages_refuse_nan_or_mismatched_conditions_and_nan_latents():
    from conftest import tiny_pipeline
    from hart_pipeline import decode_tokens, generate_tokens

    pipe = tiny_pipeline()
    embeds, positions, _, _ = pipe.encode_prompt("a red circle")
    with pytest.raises(ValueError, match="`context` contains NaN"):
        generate_tokens(pipe.transformer, pipe.vae, torch.full_like(embeds, float("nan")), positions)
    with pytest.raises(ValueError, match="negative_context .* must have the shape of context"):
        generate_tokens(pipe.transformer, pipe.vae, embeds, positions, embeds[..., :7], positions)
    with pytest.raises(ValueError, match="`context` must be a torch.Tensor"):
        generate_tokens(pipe.transformer, pipe.vae, None, positions)
    tokens = generate_tokens(pipe.transformer, pipe.vae, embeds, positions, generator=torch.Generator().manual_seed(0))
    tokens.latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latent holds NaN or infinite values"):
        decode_tokens(pipe.vae, tokens)
