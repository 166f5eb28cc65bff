"""The MaskGIT final stage (``num_maskgit_iters > 1``) against numbers recorded from the official code.

Fixtures: ``tests/fixtures/parity/<config>/maskgit.safetensors`` + ``maskgit.json`` (how they were recorded:
tests/fixtures/README.md, "MaskGIT final stage").
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hart_pipeline import add_residual, decode_tokens, generate_tokens
from hart_pipeline.sampling import maskgit_orders, maskgit_steps

from conftest import FIXTURES, recorded_hidden_states, text_condition, tiny_transformer, tiny_vae
from test_parity import _load_case, abs_err, rel_err


@pytest.fixture(scope="module", params=["tiny4", "tiny8"])
def case(request, tmp_path_factory):
    case = _load_case(request.param, tmp_path_factory)
    root = os.path.join(FIXTURES, "parity", request.param)
    case["maskgit"] = load_file(os.path.join(root, "maskgit.safetensors"))
    with open(os.path.join(root, "maskgit.json")) as f:
        case["runs"] = json.load(f)["runs"]
    return case


def _generate(case, run):
    e, info = case["expected"], case["runs"][run]
    return generate_tokens(
        case["transformer"], case["vae"], e["ctx"], e["ctx_pos"], patch_nums=case["patch_nums"], guidance_scale=4.5,
        top_k=1 if info["greedy"] else None, smooth=info["smooth"], generator=torch.Generator().manual_seed(7),
        num_maskgit_iters=info["num_maskgit_iters"], maskgit_rng=np.random.RandomState(123))


def test_orders_and_schedule_match_official(case):
    m, B = case["maskgit"], case["expected"]["ctx"].shape[0]
    L = case["patch_nums"][-1] ** 2
    for run, info in case["runs"].items():
        orders = maskgit_orders(B, L, np.random.RandomState(123))
        assert torch.equal(orders, m[f"{run}.orders"]), run
        steps = maskgit_steps(orders, info["num_maskgit_iters"])
        assert [s.shape[1] for s in steps] == info["tokens_per_iteration"], run
        for k, positions in enumerate(steps):
            assert torch.equal(positions, m[f"{run}.step.{k}.positions"]), (run, k)


def test_maskgit_sampling_matches_official(case):
    """Greedy and seeded, plain and smooth, 4 and more iterations: the official tokens and image."""
    m = case["maskgit"]
    for run in case["runs"]:
        tokens = _generate(case, run)
        for si, idx in enumerate(tokens.indices):
            assert torch.equal(idx, m[f"{run}.idx.{si}"]), f"{run}: scale {si} tokens differ"
        tokens = add_residual(tokens, case["head"], case["scheduler"], generator=torch.Generator().manual_seed(123))
        assert abs_err(decode_tokens(case["vae"], tokens), m[f"{run}.image"]) <= 1e-4, run


def test_maskgit_iterations_logits_and_residual_condition_match_official(case):
    """Per iteration: the raw logits of both CFG halves and the residual head's condition."""
    m, transformer = case["maskgit"], case["transformer"]
    run = "k4.greedy.plain"
    with recorded_hidden_states(transformer) as hidden:
        tokens = _generate(case, run)
    B = case["expected"]["ctx"].shape[0]
    condition = transformer.embed_context(torch.cat([case["expected"]["ctx"], torch.zeros_like(case["expected"]["ctx"])]))
    modulation = transformer.head_modulation(condition)
    num_final = case["runs"][run]["num_maskgit_iters"]
    for k, h in enumerate(hidden[-num_final:]):
        with torch.no_grad():
            assert rel_err(transformer.logits(h, modulation), m[f"{run}.step.{k}.logits"]) <= 1e-4, k
        positions = m[f"{run}.step.{k}.positions"].repeat(2, 1)
        cond = tokens.residual_condition.gather(1, positions[..., None].expand(-1, -1, condition.shape[-1]))
        assert abs_err(cond.flatten(0, 1), m[f"{run}.step.{k}.diff_cond"]) <= 1e-4, k
    assert [g.sum(1).tolist() for g in tokens.residual_positions] == [[n] * B for n in case["runs"][run]["tokens_per_iteration"]]


def test_one_iteration_is_the_default_path():
    transformer, vae = tiny_transformer(), tiny_vae()
    context, positions = text_condition()
    a = generate_tokens(transformer, vae, context, positions, generator=torch.Generator().manual_seed(0))
    b = generate_tokens(transformer, vae, context, positions, generator=torch.Generator().manual_seed(0),
                        num_maskgit_iters=1, maskgit_rng=np.random.RandomState(5))
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and a.residual_positions is None


def test_maskgit_seeded_by_generator_is_reproducible():
    transformer, vae = tiny_transformer(), tiny_vae()
    context, positions = text_condition()
    runs = [generate_tokens(transformer, vae, context, positions, num_maskgit_iters=4,
                            generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0].latent, runs[1].latent)
    assert not torch.equal(runs[0].latent, runs[2].latent)


@pytest.mark.parametrize("iters", [0, 17, 2.0])
def test_bad_maskgit_iters(iters):
    transformer, vae = tiny_transformer(), tiny_vae()
    context, positions = text_condition()
    with pytest.raises(ValueError, match="num_maskgit_iters"):
        generate_tokens(transformer, vae, context, positions, num_maskgit_iters=iters)


def test_pipeline_num_maskgit_iters():
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    run = lambda k, seed=0: pipe("a red circle", num_maskgit_iters=k, generator=torch.Generator().manual_seed(seed),
                                 output_type="pt").images
    assert torch.equal(run(4), run(4)) and not torch.equal(run(4), run(1))
    with pytest.raises(ValueError, match="num_maskgit_iters"):
        run(0)
