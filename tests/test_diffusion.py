"""Diffusion maths against closed forms: schedules, parameterisations, and samplers driven by oracles.

The sampler tests use data distributions whose optimal denoiser is known exactly (a single point,
and an axis-aligned Gaussian), so any error in a sampler's update rule shows up as a wrong sample
distribution rather than being hidden behind an imperfect network.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latdiffunet.diffusion import (
    PARAMETERIZATIONS,
    NoiseSchedule,
    broadcast_to,
    ddim_sample,
    ddpm_sample,
    inference_timesteps,
    predict_x0_and_eps,
    training_target,
)

# ----------------------------------------------------------------------------- oracle helpers


def oracle_denoiser(schedule: NoiseSchedule, kind: str, posterior_mean_x0):
    """Wrap E[x0 | x_t] as a denoiser emitting the ``kind`` target, written out independently of
    the package's conversion code so the tests do not check that code against itself."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        alpha, sigma = schedule.alpha_sigma(t, ndim=x_t.ndim, dtype=x_t.dtype)
        x0 = posterior_mean_x0(x_t, alpha, sigma)
        eps = (x_t - alpha * x0) / sigma
        if kind == "x0":
            return x0
        if kind == "eps":
            return eps
        return alpha * eps - sigma * x0

    return denoise


def delta_x0(point: torch.Tensor):
    """Data is the single point ``point``: E[x0 | x_t] = point whatever x_t is."""
    return lambda x_t, alpha, sigma: point.to(x_t.dtype).expand_as(x_t)


def gaussian_x0(mu: torch.Tensor, s: torch.Tensor):
    """Data ~ N(mu, s^2) per dimension, so
    E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)."""

    def f(x_t, alpha, sigma):
        m, v = mu.to(x_t.dtype), (s**2).to(x_t.dtype)
        return m + alpha * v / (alpha**2 * v + sigma**2) * (x_t - alpha * m)

    return f


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "T,n", [(1000, 1), (1000, 2), (1000, 7), (1000, 50), (1000, 1000), (50, 50), (10, 3)]
)
def test_inference_timesteps(T, n):
    ts = inference_timesteps(T, n)
    assert len(ts) == n
    assert ts[0] == T - 1
    assert all(isinstance(t, int) for t in ts)
    assert all(a > b for a, b in zip(ts, ts[1:])), "must be strictly descending (hence unique)"
    assert ts[-1] >= 0
    if n == T:
        assert ts == list(range(T - 1, -1, -1))


def test_inference_timesteps_rejects_bad_counts():
    for n in (0, 11):
        with pytest.raises(ValueError):
            inference_timesteps(10, n)


def test_cosine_schedule_shape_and_limits():
    T = 1000
    sched = NoiseSchedule.cosine(T)
    abar = sched.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (T,)
    assert bool((abar[1:] < abar[:-1]).all()), "abar must strictly decrease"
    assert abar[0] > 0.999
    assert abar[-1] < 1e-4
    assert float(sched.betas.max()) <= 0.999 + 1e-12
    # Away from the clipped end, abar_t equals f(t+1)/f(0) of Nichol & Dhariwal.
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert abs(float(abar[t]) - f(t + 1) / f(0)) < 1e-12


def test_linear_schedule_matches_closed_form():
    T = 300
    sched = NoiseSchedule.linear(T, beta_start=1e-4, beta_end=2e-2)
    expected = np.cumprod(1 - np.linspace(1e-4, 2e-2, T))
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(sched.betas.numpy(), np.linspace(1e-4, 2e-2, T), atol=1e-12)


def test_from_name():
    np.testing.assert_array_equal(
        NoiseSchedule.from_name("cosine", 100).alphas_cumprod.numpy(),
        NoiseSchedule.cosine(100).alphas_cumprod.numpy(),
    )
    assert len(NoiseSchedule.from_name("linear", 100)) == 100
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule.from_name("sigmoid", 100)


def test_schedule_rejects_invalid_tables():
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.9, 0.95]))  # increasing
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([1.0, 0.5]))  # abar = 1: x0-prediction undefined
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.5, 0.0]))  # abar = 0: eps-prediction undefined


def test_alpha_sigma_snr_and_broadcast():
    sched = NoiseSchedule.cosine(1000)
    t = torch.tensor([0, 1, 499, 999])
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.shape == (4,) and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha.double() ** 2, sched.alphas_cumprod[t], atol=1e-7, rtol=0)
    a5, s5 = sched.alpha_sigma(t, ndim=5, dtype=torch.float64)
    assert a5.shape == (4, 1, 1, 1, 1) and s5.dtype == torch.float64
    torch.testing.assert_close(sched.snr(t, dtype=torch.float64), (a5**2 / s5**2).flatten())
    assert broadcast_to(torch.arange(3.0), 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        sched.alpha_sigma(torch.tensor([0.5]))  # float timesteps would silently truncate
    with pytest.raises(ValueError):
        sched.alpha_sigma(torch.tensor([1000]))


def test_q_sample_marginal():
    sched = NoiseSchedule.cosine(1000)
    t = torch.tensor([0, 100, 500, 999])
    n = 20000
    x0 = torch.tensor([0.5, -1.0, 2.0, 1.3]).view(4, 1).expand(4, n).contiguous()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sched.q_sample(x0, t, noise)
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(x_t.mean(1), alpha * x0[:, 0], atol=0.03, rtol=0)
    torch.testing.assert_close(x_t.std(1) / sigma, torch.ones(4), atol=0.03, rtol=0)


# ----------------------------------------------------------------------------- parameterisations


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_parameterization_round_trip(kind):
    sched = NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(1)
    B = 16
    x0 = torch.randn(B, 2, 3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (B,), generator=g)
    t[:2] = torch.tensor([0, 999])  # the ill-conditioned ends
    alpha, sigma = sched.alpha_sigma(t, ndim=x0.ndim, dtype=torch.float64)
    x_t = sched.q_sample(x0, t, noise)

    target = training_target(kind, x0, noise, alpha, sigma)
    expected = {"eps": noise, "x0": x0, "v": alpha * noise - sigma * x0}[kind]
    torch.testing.assert_close(target, expected, atol=0, rtol=0)

    x0_hat, eps_hat = predict_x0_and_eps(kind, target, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=1e-5, rtol=0)


def test_unknown_parameterization_is_rejected():
    sched = NoiseSchedule.cosine(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eps"):
        training_target("epsilon", x, x, 1.0, 0.0)
    with pytest.raises(ValueError, match="eps"):
        predict_x0_and_eps("score", x, x, 1.0, 0.0)
    with pytest.raises(ValueError):
        ddim_sample(lambda x, t: x, sched, x.shape, 2, "score")
    with pytest.raises(ValueError):
        ddpm_sample(lambda x, t: x, sched, x.shape, "score")


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_clip_x0_keeps_pair_consistent(kind):
    sched = NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([999, 500, 10])
    alpha, sigma = sched.alpha_sigma(t, ndim=3, dtype=torch.float64)
    x_t = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    out = 5 * torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    x0_hat, eps_hat = predict_x0_and_eps(kind, out, x_t, alpha, sigma, clip_x0=1.0)
    assert float(x0_hat.abs().max()) <= 1.0
    unclipped, _ = predict_x0_and_eps(kind, out, x_t, alpha, sigma)
    assert float(unclipped.abs().max()) > 1.0, "test must actually exercise the clamp"
    torch.testing.assert_close(alpha * x0_hat + sigma * eps_hat, x_t, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- samplers: delta data


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("num_steps", [1, 2, 5, 50])
def test_ddim_recovers_point_mass(kind, num_steps):
    sched = NoiseSchedule.cosine(1000)
    point = torch.tensor([1.5, -0.7, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    denoise = oracle_denoiser(sched, kind, delta_x0(point))
    g = torch.Generator().manual_seed(3)
    out = ddim_sample(denoise, sched, (4, 3, 5, 5), num_steps, kind, generator=g, dtype=torch.float64)
    assert out.shape == (4, 3, 5, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, point.expand_as(out), atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_ddpm_recovers_point_mass(kind):
    sched = NoiseSchedule.cosine(50)
    point = torch.tensor([1.5, -0.7], dtype=torch.float64).view(1, 2, 1, 1)
    denoise = oracle_denoiser(sched, kind, delta_x0(point))
    g = torch.Generator().manual_seed(4)
    out = ddpm_sample(denoise, sched, (3, 2, 4, 4), kind, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out, point.expand_as(out), atol=1e-8, rtol=0)


def test_3d_latent_float32():
    sched = NoiseSchedule.cosine(1000)
    point = torch.tensor([0.8, -1.1]).view(1, 2, 1, 1, 1)
    denoise = oracle_denoiser(sched, "v", delta_x0(point))
    shape = (2, 2, 4, 5, 6)
    g = torch.Generator().manual_seed(5)
    out = ddim_sample(denoise, sched, shape, 10, "v", eta=0.5, generator=g)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out, point.expand(shape), atol=1e-4, rtol=0)
    short = NoiseSchedule.cosine(20)
    out = ddpm_sample(oracle_denoiser(short, "v", delta_x0(point)), short, shape, "v", generator=g)
    assert out.shape == shape
    torch.testing.assert_close(out, point.expand(shape), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- samplers: Gaussian data

MU = torch.tensor([0.7, -1.2, 0.0]).view(1, 3)
S = torch.tensor([0.6, 1.5, 0.2]).view(1, 3)
N_SAMPLES = 4000


def _check_gaussian_samples(x: torch.Tensor, tol: float = 0.1) -> None:
    assert x.shape == (N_SAMPLES, 3)
    mean, std = x.double().mean(0), x.double().std(0)
    # Mean: absolute tolerance. Std: relative, so the narrow dimension (s = 0.2) is held to the
    # same standard as the wide one instead of passing by being close to zero.
    assert bool(((mean - MU[0].double()).abs() <= tol).all()), mean
    assert bool(((std / S[0].double() - 1).abs() <= tol).all()), std


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_ddim_samples_gaussian(kind):
    sched = NoiseSchedule.cosine(1000)
    denoise = oracle_denoiser(sched, kind, gaussian_x0(MU, S))
    g = torch.Generator().manual_seed(6)
    x = ddim_sample(denoise, sched, (N_SAMPLES, 3), 50, kind, eta=0.0, generator=g)
    _check_gaussian_samples(x)


def test_ddpm_samples_gaussian():
    sched = NoiseSchedule.cosine(200)
    denoise = oracle_denoiser(sched, "eps", gaussian_x0(MU, S))
    g = torch.Generator().manual_seed(7)
    x = ddpm_sample(denoise, sched, (N_SAMPLES, 3), "eps", generator=g)
    _check_gaussian_samples(x)


def test_ddim_without_oracle_knowledge_fails_the_gaussian_check():
    """Guard against a vacuous statistics check: a denoiser that ignores the data spread
    (claims the data is the point mu) must fail it."""
    sched = NoiseSchedule.cosine(1000)
    denoise = oracle_denoiser(sched, "x0", delta_x0(MU))
    g = torch.Generator().manual_seed(6)
    x = ddim_sample(denoise, sched, (N_SAMPLES, 3), 50, "x0", generator=g)
    with pytest.raises(AssertionError):
        _check_gaussian_samples(x)


# ----------------------------------------------------------------------------- sampler consistency


def test_ddim_eta1_all_steps_equals_ddpm():
    """DDIM with eta = 1 on every timestep is the DDPM posterior; the two independent
    implementations must agree draw for draw given the same generator."""
    T = 30
    sched = NoiseSchedule.cosine(T)
    denoise = oracle_denoiser(sched, "v", gaussian_x0(MU, S))
    shape = (64, 3)
    a = ddim_sample(denoise, sched, shape, T, "v", eta=1.0,
                    generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    b = ddpm_sample(denoise, sched, shape, "v",
                    generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_ddim_eta0_is_deterministic_given_x_T_and_leaves_it_untouched():
    sched = NoiseSchedule.cosine(100)
    denoise = oracle_denoiser(sched, "eps", gaussian_x0(MU, S))
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(9))
    x_T_copy = x_T.clone()
    a, b = (
        ddim_sample(denoise, sched, x_T.shape, 10, "eps", x_T=x_T,
                    generator=torch.Generator().manual_seed(seed))
        for seed in (1, 2)
    )
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(x_T, x_T_copy, atol=0, rtol=0)
    # eta > 0 injects noise: different generators now give different samples.
    c, d = (
        ddim_sample(denoise, sched, x_T.shape, 10, "eps", eta=1.0, x_T=x_T,
                    generator=torch.Generator().manual_seed(seed))
        for seed in (1, 2)
    )
    assert not torch.allclose(c, d)


def test_sampler_rejects_wrong_denoiser_output_shape():
    sched = NoiseSchedule.cosine(10)
    with pytest.raises(ValueError, match="denoiser returned shape"):
        ddim_sample(lambda x, t: x[:, :1], sched, (2, 3, 4, 4), 2, "eps")
