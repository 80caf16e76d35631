"""UniPC (bh2, order 2, data prediction) against expected values, through the public ``terdit_edge.sample``.

Shapes, RNG draws, callbacks, batch invariance and the guidance interval of every registered sampler
are tested in test_samplers.py (unipc is in their lists); here:

* parity with diffusers' ``UniPCMultistepScheduler`` (solver_order 2, bh2, predict_x0,
  lower_order_final, final_sigmas_type "zero", the same respaced timesteps), after every step;
* the predictor is DPM-Solver++(2M) bit for bit (UniP-2 with B(h) = expm1(h) is the same update), so
  UniPC with its corrector switched off is dpm++2m;
* a torch-free float64 check on Gaussian data (closed-form denoiser and probability-flow solution,
  test_dpm_solver.py's model): UniPC converges at third order where DPM-Solver++(2M) converges at
  second and DDIM at first, and it is the more accurate of the two at few steps on that schedule;
* the corrector's coefficients: their small-step limit is the Adams-Moulton corrector; the
  correction is an increment to the x the sampler is given (what inpainting needs);
* on the bundled model: with the step cache and guidance reuse, and the shipped unipc-N schedules
  (edit and inpainting: test_edit.py).
"""
from __future__ import annotations

import numpy as np
import pytest

import terdit_edge
from terdit_edge import diffusion
from terdit_edge.diffusion import Schedule, UniPC, respaced_timesteps
from tests.test_dpm_solver import MU, FieldModel, S, _alpha_sigma, gaussian_eps, scheduler_trajectory


def run(model, steps, sampler="unipc", batch=2, seed=11):
    seen = []
    terdit_edge.sample(model, list(range(batch)), steps=steps, sampler=sampler, cfg_scale=1.0, seed=seed,
                       callback=lambda i, n, z: seen.append(z.copy()))
    t_first = int(model.calls[0][1][0])
    x_init = np.concatenate([x for x, t in model.calls if int(t[0]) == t_first])
    return x_init, seen


# --- parity with diffusers -----------------------------------------------------------------------


def diffusers_trajectory(x_init, timesteps, eps_fn):
    torch = pytest.importorskip("torch", reason="the diffusers parity check needs torch (test extras)")
    diffusers = pytest.importorskip("diffusers", reason="the parity check needs diffusers (test extras)")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
        prediction_type="epsilon", predict_x0=True, solver_type="bh2", lower_order_final=True,
        disable_corrector=[], final_sigmas_type="zero", use_karras_sigmas=False)
    ts = sorted(timesteps, reverse=True)
    sched.set_timesteps(len(ts))
    # our respaced timesteps (diffusers' UniPC takes no custom timesteps): sigma = sqrt((1 - abar) / abar),
    # then 0 for the final step to clean data
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    sched.timesteps = torch.tensor(ts, dtype=torch.int64)
    sched.sigmas = torch.tensor([float(np.sqrt((1 - abar[t]) / abar[t])) for t in ts] + [0.0], dtype=torch.float64)
    sched.set_begin_index(0)
    return [x.astype(np.float32) for x in scheduler_trajectory(torch, sched, x_init, eps_fn)]


@pytest.mark.parametrize("steps", [20, 8, 5, 3])
def test_unipc_matches_diffusers_after_every_step(steps):
    model = FieldModel()
    x_init, ours = run(model, steps)
    theirs = diffusers_trajectory(x_init, respaced_timesteps(steps), model.eps_fn)
    assert len(theirs) == len(ours) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 2e-5, f"step {i} of {steps}: max |ours - diffusers| = {err:.2e} x max |diffusers|"
    assert np.abs(ours[-1] - x_init).max() > 0.5  # the run went somewhere


def test_unipc_on_a_searched_schedule_matches_diffusers():
    ts = diffusion.schedule_timesteps("dpm++2m-5")
    model = FieldModel()
    x_init, ours = run(model, ts)
    theirs = diffusers_trajectory(x_init, ts, model.eps_fn)
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() / np.abs(b).max() < 2e-5


# --- the predictor is DPM-Solver++(2M) -----------------------------------------------------------


def test_without_its_corrector_unipc_is_dpm_solver_pp_2m_bit_for_bit(monkeypatch):
    kw = dict(steps=8, cfg_scale=1.0, seeds=[3, 4])
    with_corrector = terdit_edge.sample(FieldModel(), [1, 2], sampler="unipc", **kw)
    dpm = terdit_edge.sample(FieldModel(), [1, 2], sampler="dpm++2m", **kw)
    assert not np.array_equal(with_corrector, dpm)
    monkeypatch.setattr(UniPC, "corrector_coefficients", lambda self, j: (0.0, 0.0))
    assert terdit_edge.sample(FieldModel(), [1, 2], sampler="unipc", **kw).tobytes() == dpm.tobytes()


@pytest.mark.parametrize("steps", [1, 2])
def test_with_no_step_to_correct_unipc_is_dpm_solver_pp_2m(steps):
    # 1 step: the data prediction; 2 steps: one first-order step, whose point only the final data
    # prediction reads (the reference corrects nothing there either)
    kw = dict(steps=steps, cfg_scale=1.0, seed=2)
    assert terdit_edge.sample(FieldModel(), [0], sampler="unipc", **kw).tobytes() == \
        terdit_edge.sample(FieldModel(), [0], sampler="dpm++2m", **kw).tobytes()


def test_same_call_same_bytes_and_the_corrector_is_elementwise():
    kw = dict(steps=6, sampler="unipc", cfg_scale=1.0)
    a = terdit_edge.sample(FieldModel(), [1, 2, 3], seeds=[9, 8, 7], **kw)
    assert a.tobytes() == terdit_edge.sample(FieldModel(), [1, 2, 3], seeds=[9, 8, 7], **kw).tobytes()
    assert a[1].tobytes() == terdit_edge.sample(FieldModel(), [2], seeds=[8], **kw)[0].tobytes()


# --- convergence on Gaussian data ----------------------------------------------------------------


def exact_to(x_init, t_start, t_end):
    """The probability-flow ODE from t_start down to t_end (keeps the standardized value), then the
    data prediction at t_end, which is what the sampler's last step returns."""
    a1, s1 = _alpha_sigma(t_start)
    a0, s0 = _alpha_sigma(t_end)
    z = (x_init.astype(np.float64) - a1 * MU) / np.sqrt(a1 * a1 * S * S + s1 * s1)
    x_t = a0 * MU + np.sqrt(a0 * a0 * S * S + s0 * s0) * z
    eps = s0 * (x_t - a0 * MU) / (a0 * a0 * S * S + s0 * s0)
    return (x_t - s0 * eps) / a0


def timesteps_from(n, lo=200):
    """n timesteps evenly spread over lo..999: log-SNR steps of similar size, so that the asymptotic
    order shows at a few dozen steps (uniform respacing ends at t = 0, where one log-SNR step of
    about 3 dominates every solver's error below ~100 steps)."""
    return sorted({int(round(v)) for v in np.linspace(lo, 999, n)})


def error(n, sampler):
    ts = timesteps_from(n)
    model = FieldModel(eps_fn=gaussian_eps)
    out = terdit_edge.sample(model, [0], steps=ts, sampler=sampler, cfg_scale=1.0, seed=5)
    exact = exact_to(model.calls[0][0], ts[-1], ts[0])
    return float(np.abs(out - exact).max() / np.abs(exact).max())


def test_unipc_converges_at_third_order_dpm_at_second_ddim_at_first():
    # measured (this model is linear in x, so the ratios do not depend on the seed): error ratios
    # 20 -> 40 -> 80 steps, UniPC 9.8 and 9.3, DPM-Solver++(2M) 4.3 and 4.2, DDIM 2.04 and 2.02
    # (UniPC at 160 steps reaches the float32 floor, ~1e-6)
    errs = {s: {n: error(n, s) for n in (20, 40, 80)} for s in ("unipc", "dpm++2m", "ddim")}
    assert errs["unipc"][80] < 1e-5, errs
    for coarse, fine in ((20, 40), (40, 80)):
        ratio = {s: e[coarse] / e[fine] for s, e in errs.items()}
        assert 7.0 < ratio["unipc"] < 12.0, (coarse, fine, ratio, errs)  # third order: ~8
        assert 3.5 < ratio["dpm++2m"] < 4.8, (coarse, fine, ratio, errs)  # second order: ~4
        assert 1.8 < ratio["ddim"] < 2.3, (coarse, fine, ratio, errs)  # first order: ~2
        assert errs["unipc"][fine] < errs["dpm++2m"][fine] < errs["ddim"][fine]


@pytest.mark.parametrize("n", [4, 5, 6, 8, 10])
def test_unipc_is_more_accurate_than_dpm_solver_pp_2m_at_few_steps(n):
    # measured error ratios UniPC / DPM-Solver++(2M) on this schedule: 0.89 (4 steps), 0.80, 0.72,
    # 0.58, 0.48 (10 steps). Not a law of every schedule: on uniform respacing, whose last step
    # lands on t = 0 uncorrected, UniPC is 0.45x at 5 steps but 1.02-1.10x at 6-20 steps.
    u, d = error(n, "unipc"), error(n, "dpm++2m")
    assert u < 0.95 * d, (n, u, d)


# --- the corrector's coefficients ----------------------------------------------------------------


def test_small_step_corrector_is_adams_moulton():
    """With equal log-SNR steps h -> 0 the corrected point is x~ + h (5/12 D_t + 8/12 D_0 - 1/12 D_1)
    in terms of the data predictions' contributions, i.e. a_t -> 5/12 and a_1 -> 1/12 (r = -1)."""
    solver = UniPC(Schedule.create(1000))
    j = 500
    lam = solver.lam
    h = lam[j] - lam[j + 1]
    assert abs((lam[j + 2] - lam[j + 1]) / h + 1) < 1e-2  # nearly equal steps
    solver.history = [(j + 2, None), (j + 1, None)]
    c_t, c_1 = solver.corrector_coefficients(j)
    scale = -solver.alpha[j] * np.expm1(-h)
    r = (lam[j + 2] - lam[j + 1]) / h
    a_t, a_1 = c_t / scale, c_1 * r / scale + 0.5
    assert a_t == pytest.approx(5 / 12, abs=2e-3) and a_1 == pytest.approx(1 / 12, abs=2e-3)
    solver.history = [(j + 1, None)]
    assert solver.corrector_coefficients(j) == (pytest.approx(scale * 0.5, rel=1e-12), 0.0)


def test_the_corrector_keeps_a_change_made_to_x_between_steps():
    """Inpainting re-imposes the known region after every step; the corrector adds its increment to
    the x it is given (it does not recompute the point from the previous one, which would drop the
    change). With eps fixed, a change d of the x given to step j moves the result by exactly
    ratio (1 + c_t / alpha_j) d + coef k d / alpha_j (k: the predictor's weight of x0_j)."""
    s = Schedule.create(10)
    rng = np.random.default_rng(0)
    outs = [np.concatenate([rng.standard_normal((1, 4, 4, 4)), np.zeros((1, 4, 4, 4))], axis=1).astype(np.float32)
            for _ in range(3)]
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    a, b = UniPC(s), UniPC(s)
    for j, out in zip((9, 8), outs):
        x, xb = a.step(j, x, out), b.step(j, x, out)
        assert np.array_equal(xb, x)
    d = np.zeros_like(x)
    d[..., :2, :] = 0.25
    j = 7
    c_t, c_1 = a.corrector_coefficients(j)
    h, h_prev = a.lam[j - 1] - a.lam[j], a.lam[j] - a.lam[j + 1]
    ratio, coef = a.sigma[j - 1] / a.sigma[j], a.alpha[j - 1] * -np.expm1(-h)
    k = 1 + h / (2 * h_prev)
    want = ratio * (1 + c_t / a.alpha[j]) * d + coef * k * d / a.alpha[j]
    got = b.step(j, x + d, outs[2]) - a.step(j, x, outs[2])
    assert np.allclose(got, want, atol=1e-5) and np.abs(want).max() > 0.1
    assert np.abs(got[..., 2:, :]).max() < 1e-6  # elementwise: nothing moves outside the change


# --- with the features that drive a sampler, on the bundled model ---------------------------------


@pytest.fixture(scope="module")
def digits_model():
    from terdit_edge.pipeline import Pipeline

    return Pipeline.load(threads=1).model


@pytest.mark.parametrize("kw", [{"cache": "adaptive:0.2"}, {"guidance_reuse": "fixed:3"},
                                {"cache": "fixed:2", "guidance_reuse": "fixed:2", "guidance_interval": (0, 600)}])
def test_unipc_with_the_step_cache_and_guidance_reuse_is_batch_invariant_and_as_near_exact_as_dpm(digits_model, kw):
    """The options work on UniPC as on DPM-Solver++(2M): fewer evaluations, an image independent of
    its batch, and about as far from the sampler's own exact images (measured, 20 steps: relative
    RMS distance UniPC / DPM++ 0.354 / 0.266, 0.124 / 0.108, 0.199 / 0.204 for the three options)."""
    labels, seeds = [0, 3, 7], [5, 6, 7]
    dist = {}
    for sampler in ("dpm++2m", "unipc"):
        exact_stats, stats = {}, {}
        base = dict(sampler=sampler, steps=20, cfg_scale=4.0)
        exact = terdit_edge.sample(digits_model, labels, seeds=seeds, stats=exact_stats, **base)
        batch = terdit_edge.sample(digits_model, labels, seeds=seeds, stats=stats, **base, **kw)
        assert stats["network_evals"] < exact_stats["network_evals"] == 2 * 20 * 3
        assert np.isfinite(batch).all()
        dist[sampler] = float(np.sqrt(np.mean((batch - exact) ** 2) / np.mean(exact ** 2)))
    assert dist["unipc"] < 1.5 * dist["dpm++2m"], dist
    alone = terdit_edge.sample(digits_model, [labels[1]], seeds=[seeds[1]], **base, **kw)
    assert alone[0].tobytes() == batch[1].tobytes()


def test_unipc_schedules_are_shipped_and_selectable_by_name(digits_model):
    for n in (4, 5, 8, 10, 15):
        ts = diffusion.schedule_timesteps(f"unipc-{n}")
        assert len(ts) == n and ts[-1] == 999 and diffusion.named_schedules()[f"unipc-{n}"]["sampler"] == "unipc"
    a = terdit_edge.sample(digits_model, [2], seeds=[1], sampler="unipc", schedule="unipc-5")
    b = terdit_edge.sample(digits_model, [2], seeds=[1], sampler="unipc", steps=diffusion.schedule_timesteps("unipc-5"))
    assert a.tobytes() == b.tobytes()
