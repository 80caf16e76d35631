"""DPM-Solver++(2M) against expected values, through the public ``terdit_edge.sample``.

Two independent checks of the numbers (shapes, RNG draws and callbacks are tested in
test_samplers.py):

* parity with diffusers' ``DPMSolverMultistepScheduler`` (algorithm_type "dpmsolver++", solver_order
  2, midpoint, the same respaced timesteps given as custom timesteps, fed the eps half of the model
  output as our sampler uses it), compared after every step;
* a torch-free float64 check on a Gaussian data distribution, whose ideal denoiser and
  probability-flow ODE solution are known in closed form: the solver must converge to the exact
  solution at second order (halving the step size divides the error by about 4).

The final step: our sampler returns the data prediction of the smallest kept timestep (t = 0).
diffusers with ``final_sigmas_type="zero"`` steps from that timestep to sigma = 0 with a first-order
update, which is the same data prediction; with ``lower_order_final=False`` it uses no other
lower-order step, as ours does not.

The inputs of each run are taken from what the sampler gives the model (its first call), so the
checks hold whatever the seeding rule is.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import terdit_edge
from terdit_edge.diffusion import respaced_timesteps


class FieldModel:
    """A deterministic, nonlinear, per-element eps predictor (the sampler's view of a model).

    eps(x, t) = tanh(0.7 x) * (0.4 + t / 1500) + 0.15 sin(1.3 x + 0.2 c); the second half of the
    output (learned variance) is a constant that the ODE solver must ignore.
    """

    def __init__(self, channels=4, size=8, eps_fn=None):
        self.config = SimpleNamespace(in_channels=channels, input_size=size, guided_channels=channels,
                                      num_classes=10)
        self.null_label = 10
        self.calls = []
        self.eps_fn = eps_fn or self.default_eps

    @staticmethod
    def default_eps(x, t):
        c = np.arange(x.shape[1], dtype=np.float64)[None, :, None, None]
        tt = np.asarray(t, dtype=np.float64)[:, None, None, None]
        return np.tanh(0.7 * x) * (0.4 + tt / 1500) + 0.15 * np.sin(1.3 * x + 0.2 * c)

    def map_labels(self, ids):
        return np.asarray(ids, dtype=np.int64)

    def __call__(self, x, t, y):
        self.calls.append((x.copy(), np.asarray(t).copy()))
        eps = self.eps_fn(x.astype(np.float64), np.asarray(t)).astype(np.float32)
        return np.concatenate([eps, np.full_like(eps, 0.3)], axis=1)


def run_ours(model, steps, batch=2, seed=11):
    """Latents after every step, and the initial noise the sampler started from."""
    seen = []
    out = terdit_edge.sample(model, list(range(batch)), steps=steps, sampler="dpm++2m", cfg_scale=1.0,
                             seed=seed, callback=lambda i, n, z: seen.append(z.copy()))
    t_first = int(model.calls[0][1][0])
    x_init = np.concatenate([x for x, t in model.calls if int(t[0]) == t_first])
    assert x_init.shape == out.shape and len(seen) == steps
    return x_init, seen


# --- parity with diffusers -----------------------------------------------------------------------


def diffusers_trajectory(x_init, steps, eps_fn):
    torch = pytest.importorskip("torch", reason="the diffusers parity check needs torch (test extras)")
    diffusers = pytest.importorskip("diffusers", reason="the parity check needs diffusers (test extras)")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
        thresholding=False, lower_order_final=False, final_sigmas_type="zero", use_karras_sigmas=False)
    sched.set_timesteps(timesteps=respaced_timesteps(steps)[::-1])
    return scheduler_trajectory(torch, sched, x_init, eps_fn)


def scheduler_trajectory(torch, sched, x_init, eps_fn):
    """x after every step of a diffusers scheduler (timesteps already set) driven by eps_fn(x, t)."""
    x = torch.from_numpy(x_init.copy())
    traj = []
    for t in sched.timesteps:
        tt = np.full(x.shape[0], int(t), dtype=np.int64)
        eps = torch.from_numpy(eps_fn(x.numpy().astype(np.float64), tt).astype(np.float32))
        x = sched.step(eps, t, x).prev_sample
        traj.append(x.numpy().copy())
    return traj


@pytest.mark.parametrize("steps", [20, 8, 3])
def test_dpm_solver_pp_2m_matches_diffusers_after_every_step(steps):
    model = FieldModel()
    x_init, ours = run_ours(model, steps)
    theirs = diffusers_trajectory(x_init, steps, model.eps_fn)
    assert len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = np.abs(b).max()
        err = np.abs(a - b).max() / scale
        assert err < 2e-5, f"step {i} of {steps}: max |ours - diffusers| = {err:.2e} x max |diffusers|"
    # the comparison has teeth: the run moved far from its start and steps differ from each other
    assert np.abs(ours[-1] - x_init).max() > 0.5
    assert np.abs(ours[-2] - ours[-1]).max() > 1e-3


# --- hand-derived float64 check: Gaussian data, exact probability-flow solution -----------------

MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2) per element


def _alpha_sigma(t):
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[np.asarray(t)]
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def gaussian_eps(x, t):
    """The ideal eps predictor for Gaussian data: eps = sigma (x - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    a, s = _alpha_sigma(np.asarray(t))
    a, s = a[:, None, None, None], s[:, None, None, None]
    return s * (x - a * MU) / (a * a * S * S + s * s)


def exact_sample(x_init, t_start):
    """The probability-flow ODE from x at t_start down to t = 0 (keeps the standardized value),
    then the data prediction at t = 0, which is what the sampler's last step returns."""
    a1, s1 = _alpha_sigma(t_start)
    a0, s0 = _alpha_sigma(0)
    z = (x_init.astype(np.float64) - a1 * MU) / np.sqrt(a1 * a1 * S * S + s1 * s1)
    x_t0 = a0 * MU + np.sqrt(a0 * a0 * S * S + s0 * s0) * z
    eps = s0 * (x_t0 - a0 * MU) / (a0 * a0 * S * S + s0 * s0)
    return (x_t0 - s0 * eps) / a0


def _error(steps):
    model = FieldModel(eps_fn=gaussian_eps)
    x_init, ours = run_ours(model, steps, batch=1, seed=5)
    exact = exact_sample(x_init, 999)
    return float(np.abs(ours[-1] - exact).max() / np.abs(exact).max())


def test_dpm_solver_pp_2m_converges_at_second_order_on_gaussian_data():
    # The linear-beta timesteps are far apart in log-SNR near t = 0, so the asymptotic regime starts
    # at a few dozen steps (measured: 40 -> 80 -> 160 steps cut the error 3.8x and 4.0x).
    errs = {n: _error(n) for n in (40, 80, 160)}
    # converges, and at second order: each halving of the step cuts the error about 4x
    # (a first-order solver, or a second-order one with a wrong coefficient, gives about 2x)
    assert errs[160] < 1e-2, errs
    for coarse, fine in ((40, 80), (80, 160)):
        ratio = errs[coarse] / errs[fine]
        assert 3.3 < ratio < 4.8, f"error ratio {coarse} -> {fine} steps is {ratio:.2f} (second order: ~4); {errs}"
