"""Opt-in fast modes of generate_tokens: guidance off from a scale (Switti), cached token pruning (FastVAR)."""

import pytest
import torch

from hart_pipeline import add_residual, generate_tokens

from conftest import tiny_head, tiny_transformer, tiny_vae, text_condition
from hart_pipeline import HARTResidualScheduler

PATCH_NUMS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def parts():
    return tiny_transformer(), tiny_vae(), tiny_head()


def run(parts, seed=0, **kwargs):
    transformer, vae, head = parts
    context, positions = text_condition()
    tokens = generate_tokens(transformer, vae, context, positions, generator=torch.Generator().manual_seed(seed), **kwargs)
    return add_residual(tokens, head, HARTResidualScheduler(), generator=torch.Generator().manual_seed(seed))


def test_defaults_are_unchanged(parts):
    base = run(parts)
    for kwargs in (dict(guidance_stop_scale=None, token_pruning=None), dict(guidance_stop_scale=4),
                   dict(token_pruning={3: 0.0, 4: 0.0})):
        other = run(parts, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(base.indices, other.indices)), kwargs
        assert torch.allclose(base.residual, other.residual, atol=1e-6) and torch.equal(base.latent, other.latent), kwargs


def test_guidance_stop_scale_drops_guidance_from_that_scale(parts):
    base = run(parts)
    stopped = run(parts, guidance_stop_scale=2)
    assert all(torch.equal(a, b) for a, b in zip(base.indices[:2], stopped.indices[:2]))  # same draws before
    assert stopped.residual_guidance == 0.0 and not torch.equal(base.latent, stopped.latent)
    # from scale 0 on: exactly the guidance-free sampler (the unconditional rows never influence the others)
    free = run(parts, guidance_scale=0.0)
    none = run(parts, guidance_stop_scale=0)
    assert all(torch.equal(a, b) for a, b in zip(free.indices, none.indices))
    assert torch.allclose(free.residual, none.residual, atol=1e-5)


def test_token_pruning_changes_only_the_pruned_scales(parts):
    base = run(parts)
    pruned = run(parts, token_pruning={4: 0.5})
    assert all(torch.equal(a, b) for a, b in zip(base.indices[:3], pruned.indices[:3]))
    assert pruned.indices[3].shape == base.indices[3].shape and torch.isfinite(pruned.residual).all()
    assert not torch.equal(base.indices[3], pruned.indices[3])


def test_token_pruning_runs_only_the_pivotal_tokens(parts, monkeypatch):
    transformer = parts[0]
    seen = []
    original = transformer.forward_scale
    monkeypatch.setattr(transformer, "forward_scale", lambda x, si, *a, **k: seen.append((si, x.shape[1])) or original(x, si, *a, **k))
    run(parts, token_pruning={3: 0.5, 4: 0.75}, guidance_stop_scale=3)
    assert seen == [(0, 8), (1, 4), (2, 9 - 4), (3, 16 - 12)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_stop_scale=-1), "guidance_stop_scale"),
    (dict(guidance_stop_scale=1.5), "guidance_stop_scale"),
    (dict(token_pruning={5: 0.5}), "token_pruning"),
    (dict(token_pruning={2: 0.5}), "token_pruning"),
    (dict(token_pruning={4: 1.0}), "token_pruning"),
    (dict(token_pruning={4: 0.5}, num_maskgit_iters=2), "token_pruning"),
])
def test_bad_fast_mode_arguments(parts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(parts, **kwargs)
