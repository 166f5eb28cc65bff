"""HARTResidualScheduler: respacing, the SPEC §6 tables, step() noise handling, add_noise, determinism."""

import math

import pytest
import torch

from hart_pipeline import sample_residual

from conftest import tiny_head

# SPEC §6, respaced to 8 steps (printed with 10 significant digits), index j = 0..7
SPEC_TABLES = {
    "betas": [4.128422482e-05, 0.0548782026, 0.1487457395, 0.2495456951, 0.366071921, 0.5175657924, 0.735438841,
              0.9999999503],
    "alphas_cumprod": [0.9999587158, 0.9450827788, 0.8045057419, 0.6037447973, 0.3827307796, 0.1846424204,
                       0.04884921274, 2.428766908e-09],
    "posterior_variance": [0, 4.125489243e-05, 0.04178487268, 0.1231144732, 0.234999411, 0.3918249381, 0.6304422405,
                           0.9511507423],
    "posterior_log_variance_clipped": [-10.09574085, -10.09574085, -3.175220902, -2.09464068, -1.448172271,
                                       -0.9369401254, -0.4613337369, -0.05008271977],
    "posterior_mean_coef1": [1, 0.9992688735, 0.7396826873, 0.5648585138, 0.4608063945, 0.3927029348, 0.3322484268,
                             0.2210185696],
    "posterior_mean_coef2": [0, 0.0007308352227, 0.2591816183, 0.4273868498, 0.5111170281, 0.5258302374,
                             0.4409220149, 0.0002120867352],
    "sqrt_recip_alphas_cumprod": [1.000020643, 1.028643948, 1.114898743, 1.286984449, 1.616416612, 2.327202945,
                                  4.52450649, 20291.16963],
    "sqrt_recipm1_alphas_cumprod": [0.006425412771, 0.2410567807, 0.4929494984, 0.8101413289, 1.269961678,
                                    2.101397998, 4.412613622, 20291.16961],
}


def test_timesteps_respaced_to_8(scheduler):
    scheduler.set_timesteps(8)
    assert scheduler.timesteps.tolist() == [999, 856, 714, 571, 428, 285, 143, 0]
    assert scheduler.timestep_map.tolist() == [0, 143, 285, 428, 571, 714, 856, 999]
    assert scheduler.num_inference_steps == 8


def test_other_step_counts(scheduler):
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 0]
    scheduler.set_timesteps(1000)
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    # the 1000-step "respacing" is the training schedule itself
    assert torch.allclose(scheduler.tables["betas"], torch.from_numpy(scheduler.train_betas), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(SPEC_TABLES))
def test_tables_match_spec(scheduler, name):
    scheduler.set_timesteps(8)
    ours = scheduler.tables[name]
    assert ours.dtype == torch.float64 and ours.shape == (8,)
    for j, expected in enumerate(SPEC_TABLES[name]):
        assert abs(ours[j].item() - expected) <= 1e-9 * abs(expected) + 1e-15, (name, j, ours[j].item(), expected)


def test_log_betas_table(scheduler):
    scheduler.set_timesteps(8)
    assert torch.allclose(scheduler.tables["log_betas"], torch.log(scheduler.tables["betas"]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("steps", [0, 1, -3, 1001])
def test_invalid_step_counts(scheduler, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)


def test_unknown_timestep(scheduler):
    scheduler.set_timesteps(8)
    with pytest.raises(ValueError, match="Timestep 500"):
        scheduler.step(torch.zeros(2, 8), 500, torch.zeros(2, 4))


def _model_output(n=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2 * c, generator=g).clamp(-1, 1), torch.randn(n, c, generator=g)


def test_last_step_ignores_noise_but_consumes_the_draw(scheduler):
    scheduler.set_timesteps(8)
    out, x = _model_output()
    g = torch.Generator().manual_seed(11)
    prev = scheduler.step(out, 0, x, generator=g).prev_sample
    mean = scheduler.step(out, 0, x, noise=torch.zeros_like(x)).prev_sample
    assert torch.equal(prev, mean)
    assert torch.equal(scheduler.step(out, 0, x, noise=torch.full_like(x, 100.0)).prev_sample, mean)
    # the generator advanced by exactly one (N, Cv) draw
    reference = torch.Generator().manual_seed(11)
    torch.randn(x.shape, generator=reference)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=reference))


def test_step_closed_form(scheduler):
    """A middle step against SPEC §6 written out by hand (coefficients cast to fp32 after the gather)."""
    scheduler.set_timesteps(8)
    out, x = _model_output()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    j, t = 4, 571
    tab = {k: v[j].float() for k, v in scheduler.tables.items()}
    eps, v = out[:, :4], out[:, 4:]
    x0 = (tab["sqrt_recip_alphas_cumprod"] * x - tab["sqrt_recipm1_alphas_cumprod"] * eps).clamp(-1, 1)
    mean = tab["posterior_mean_coef1"] * x0 + tab["posterior_mean_coef2"] * x
    frac = (v + 1) / 2
    logvar = frac * tab["log_betas"] + (1 - frac) * tab["posterior_log_variance_clipped"]
    expected = mean + torch.exp(0.5 * logvar) * noise * 0.7
    result = scheduler.step(out, t, x, noise=noise, temperature=0.7)
    assert torch.allclose(result.prev_sample, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(result.pred_original_sample, x0, rtol=1e-6, atol=1e-6)
    # with noise drawn from a generator, the step noise matters before the last step
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert not torch.equal(scheduler.step(out, t, x, generator=g1).prev_sample,
                           scheduler.step(out, t, x, generator=g2).prev_sample)


def test_add_noise_closed_form(scheduler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    timesteps = torch.tensor([0, 100, 500, 900])

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # the cosine betas telescope: abar_t = alpha_bar((t + 1) / T) / alpha_bar(0) (no beta is clipped there)
    abar = torch.tensor([alpha_bar((t + 1) / 1000) / alpha_bar(0) for t in timesteps.tolist()], dtype=torch.float64)
    expected = abar.sqrt()[:, None] * x0.double() + (1 - abar).sqrt()[:, None] * noise.double()
    assert torch.allclose(scheduler.add_noise(x0, noise, timesteps).double(), expected, rtol=1e-5, atol=1e-6)


def test_sample_residual_determinism(scheduler):
    head = tiny_head()
    condition = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    a = sample_residual(head, scheduler, condition, 3.0, generator=torch.Generator().manual_seed(5))
    b = sample_residual(head, scheduler, condition, 3.0, generator=torch.Generator().manual_seed(5))
    c = sample_residual(head, scheduler, condition, 3.0, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 16)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # output is x0-clipped then scaled by residual_scale = 0.6
    assert a.abs().max() <= 0.6 + 1e-6
