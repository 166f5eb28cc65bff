"""diffusers pipeline conventions: step callbacks on every scale and residual step, PipelineCallback,
interrupt, the guidance_scale / num_timesteps properties, concurrent calls, the docstring example."""

import threading

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


PROMPT = "a red circle above a blue square"
STEPS = 3
SCALES = 4  # tiny_pipeline's patch_nums (1, 2, 3, 4)


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_callback_on_every_scale_and_residual_step(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, timestep, {k: tuple(v.shape) for k, v in tensors.items()}, p.guidance_scale, p.num_timesteps))
        return {}

    run(pipe, guidance_scale=3.0, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "residual"])
    latent = (1, 16, 4, 4)
    expected = [(si, si, {"latents": latent}, 3.0, SCALES + STEPS) for si in range(SCALES)]
    expected += [(SCALES + i, t, {"latents": latent, "residual": latent}, 3.0, SCALES + STEPS)
                 for i, t in enumerate([999, 500, 0])]
    assert seen == expected
    assert pipe.num_timesteps == SCALES + STEPS and pipe.guidance_scale == 3.0


def test_callback_returned_tensors_replace_the_state(pipe):
    def zero_residual(p, step, timestep, tensors):
        return {"residual": torch.zeros_like(tensors["residual"])} if step == SCALES + STEPS - 1 else {}

    tokens = run(pipe, output_type="latent", callback_on_step_end=zero_residual,
                 callback_on_step_end_tensor_inputs=["residual"])
    assert torch.equal(tokens.residual, torch.zeros_like(tokens.residual))

    def zero_latent(p, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == SCALES - 1 else {}

    tokens = run(pipe, output_type="latent", callback_on_step_end=zero_latent, callback_on_step_end_tensor_inputs=["latents"])
    assert torch.equal(tokens.latent, torch.zeros_like(tokens.latent))


def test_unknown_callback_tensor_is_an_error(pipe):
    with pytest.raises(ValueError, match="residual"):
        run(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"])


class RecordingCallback(PipelineCallback):
    """Acts at its cutoff step, found as diffusers' callbacks do (index, or ratio of num_timesteps)."""

    tensor_inputs = ["latents"]
    steps = None

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        cutoff = self.config.cutoff_step_index
        if cutoff is None:
            cutoff = int(pipeline.num_timesteps * self.config.cutoff_step_ratio)
        if step_index == cutoff:
            self.steps = (self.steps or []) + [(step_index, tuple(callback_kwargs))]
        return callback_kwargs


def test_pipeline_callback_and_multi_pipeline_callbacks(pipe):
    single = RecordingCallback(cutoff_step_ratio=None, cutoff_step_index=2)
    run(pipe, callback_on_step_end=single)  # tensor inputs come from the callback object
    assert single.steps == [(2, ("latents",))]
    first = RecordingCallback(cutoff_step_ratio=0.5)  # int(7 * 0.5) = step 3
    second = RecordingCallback(cutoff_step_ratio=None, cutoff_step_index=SCALES + 1)
    run(pipe, callback_on_step_end=MultiPipelineCallbacks([first, second]))
    assert first.steps == [(3, ("latents",))] and second.steps == [(SCALES + 1, ("latents",))]


@pytest.mark.parametrize("stop_at", [1, SCALES + 1])
def test_interrupt(pipe, stop_at):
    steps = []

    def callback(p, step, timestep, tensors):
        steps.append(step)
        if step == stop_at:
            p._interrupt = True
        return {}

    tokens = run(pipe, output_type="latent", callback_on_step_end=callback)
    assert steps == list(range(stop_at + 1)) and pipe.interrupt
    assert tokens.residual is None and tokens.latent.shape == (1, 16, 4, 4)
    images = run(pipe, output_type="np", callback_on_step_end=callback)  # what was generated, decoded
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    run(pipe)
    assert not pipe.interrupt  # every call starts uninterrupted


def test_concurrent_prompt_encoding(pipe):
    """Threads share the fast tokenizer, whose padding / truncation settings every call resets: the system prompt
    (unpadded) and the prompts (padded) must not see each other's settings."""
    expected = pipe.encode_prompt("a red circle")
    results, errors = [], []
    barrier = threading.Barrier(4)

    def work():
        try:
            barrier.wait()
            results.extend(pipe.encode_prompt("a red circle") for _ in range(10))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 40
    assert all(torch.equal(r[0], expected[0]) and torch.equal(r[1], expected[1]) for r in results)


def test_concurrent_calls_with_different_settings(pipe):
    """Two threads on one pipeline with different step counts: each gets its own sequential result."""
    settings = [dict(seed=1, num_inference_steps=2, guidance_scale=2.0), dict(seed=2, num_inference_steps=5, guidance_scale=4.5)]
    expected = [run(pipe, **kw) for kw in settings]
    seen = {}
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(2):
                def callback(p, step, timestep, tensors):
                    seen.setdefault(i, set()).add((p.guidance_scale, p.num_timesteps))
                    return {}

                results[i] = run(pipe, callback_on_step_end=callback, **settings[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, kw in enumerate(settings):
        assert np.array_equal(results[i], expected[i])
        assert seen[i] == {(kw["guidance_scale"], SCALES + kw["num_inference_steps"])}


def test_four_threads_with_different_arguments_match_the_calls_one_by_one(pipe):
    """Issue 28's determinism question: concurrent calls with every kind of argument give bit-identical images to
    the same calls made one by one (no shared state; the intra-op thread count stays the process's)."""
    calls = [dict(seed=0, negative_prompt="blue", guidance_scale=2.0, num_inference_steps=3),
             dict(seed=1, num_maskgit_iters=4, residual_guidance_scale=1.5),
             dict(seed=2, top_k=5, top_p=0.8, smooth=False, guidance_stop_scale=2, num_images_per_prompt=2),
             dict(seed=3, height=256, width=256, num_inference_steps=2)]
    expected = [run(pipe, **kw) for kw in calls]
    results, errors = {}, []
    barrier = threading.Barrier(len(calls))

    def work(i):
        try:
            barrier.wait()
            results[i] = run(pipe, **calls[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(len(calls)):
        assert np.array_equal(results[i], expected[i]), calls[i]


def test_docstring_example_comes_from_diffusers_helper(pipe):
    doc = type(pipe).__call__.__doc__
    assert ">>> from hart_pipeline import HARTPipeline" in doc and "dtype=torch.bfloat16" in doc
    assert "torch_dtype" not in doc
