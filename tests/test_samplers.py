"""Schedules, respacing, the randomness contract, callbacks, guidance and argument checks of the samplers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import terdit_edge
from terdit_edge import Pipeline, diffusion
from terdit_edge.diffusion import (
    SAMPLER_REGISTRY,
    SAMPLERS,
    Schedule,
    guided_model_output,
    linear_betas,
    respaced_timesteps,
    sample,
    sampler_class,
)
from terdit_edge.errors import InputError, TerditError

# --- respacing ----------------------------------------------------------------------------------


def authors_respacing(n: int, t: int = 1000) -> list[int]:
    """The rule of the authors' space_timesteps for one section: repeated addition of the fractional
    stride (t - 1) / (n - 1), each value rounded with Python's round (half to even)."""
    stride = 1 if n <= 1 else (t - 1) / (n - 1)
    cur, taken = 0.0, []
    for _ in range(n):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@pytest.mark.parametrize("n", [1, 2, 8, 10, 25, 50, 250, 1000])
def test_respaced_timesteps_follow_the_authors_rule(n):
    kept = respaced_timesteps(n)
    assert kept == authors_respacing(n)
    assert len(kept) == n and kept[0] == 0 and kept == sorted(kept)
    if n > 1:
        assert kept[-1] == 999
    assert respaced_timesteps(str(n)) == kept


def test_respaced_timesteps_known_values():
    assert respaced_timesteps(1) == [0]
    assert respaced_timesteps(2) == [0, 999]
    assert respaced_timesteps(10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert respaced_timesteps(1000) == list(range(1000))
    # stride 999/24 = 41.625 is exact in binary: 4 * 41.625 = 166.5 rounds to the even 166, 12 * -> 500
    kept = respaced_timesteps(25)
    assert kept[4] == 166 and kept[12] == 500 and kept[20] == 832
    assert respaced_timesteps(8) == [0, 143, 285, 428, 571, 714, 856, 999]


def test_ddim_spec_uses_the_integer_stride():
    assert respaced_timesteps("ddim25") == list(range(0, 1000, 40))
    assert respaced_timesteps("ddim50") == list(range(0, 1000, 20))
    assert respaced_timesteps("ddim10") == list(range(0, 1000, 100))
    # 7 steps: stride 143 (0, 143, ..., 858) is the first whose range has 7 entries
    assert respaced_timesteps("ddim7") == list(range(0, 1000, 143))


@pytest.mark.parametrize("spec", ["ddim37", "ddim41", "ddim1", "ddim0", "ddimx", "ddim"])
def test_ddim_spec_without_an_integer_stride_is_an_input_error(spec):
    with pytest.raises(InputError, match="ddim"):
        respaced_timesteps(spec)


# --- schedule coefficients -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [1, 2, 10, 50, 250, 1000, "ddim25"])
def test_schedule_coefficients_match_direct_float64_formulas(spec):
    s = Schedule.create(spec)
    base_betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    base_abar = np.cumprod(1.0 - base_betas)
    kept = respaced_timesteps(spec)
    abar = base_abar[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1.0 - abar / abar_prev
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)

    assert s.timesteps.tolist() == kept and len(s) == len(kept)
    for arr in (s.betas, s.alphas_cumprod, s.posterior_mean_coef1, s.posterior_log_variance_clipped):
        assert arr.dtype == np.float64
    np.testing.assert_allclose(s.betas, betas, rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod_prev, abar_prev, rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod, np.sqrt(1.0 / abar), rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1.0 / abar - 1.0), rtol=1e-11)
    np.testing.assert_allclose(s.posterior_mean_coef1, betas * np.sqrt(abar_prev) / (1.0 - abar), rtol=1e-11)
    np.testing.assert_allclose(s.posterior_mean_coef2, (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
                               rtol=1e-11)
    np.testing.assert_allclose(s.log_betas, np.log(betas), rtol=1e-12)
    if len(kept) > 1:  # the first (zero) posterior variance is replaced by the second
        np.testing.assert_allclose(s.posterior_log_variance_clipped,
                                   np.log(np.concatenate([[post_var[1]], post_var[1:]])), rtol=1e-12)
    assert np.isfinite(s.posterior_log_variance_clipped).all()


def test_full_schedule_reproduces_the_training_betas():
    s = Schedule.create(1000)
    np.testing.assert_allclose(s.betas, linear_betas(), rtol=1e-9)
    assert linear_betas()[0] == 1e-4 and linear_betas()[-1] == 0.02


# --- a fake model that records what the sampler gives it ---------------------------------------


class RecordingModel:
    """Implements the sampler's view of a model; records (x, t, y) of every call.

    Output: eps = 0.1 * x + 0.01 * (label + 1) per channel offset, v = tanh of a label term, so
    conditional and unconditional halves differ and every channel is distinct.
    """

    def __init__(self, in_channels=4, input_size=8, num_classes=10, guided_channels=3):
        self.config = SimpleNamespace(in_channels=in_channels, input_size=input_size,
                                      guided_channels=guided_channels, num_classes=num_classes)
        self.calls = []
        self.null_label = num_classes
        self.num_classes = num_classes

    def map_labels(self, ids):
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError("bad labels")
        return ids.astype(np.int64)

    def __call__(self, x, t, y):
        self.calls.append((x.copy(), np.asarray(t).copy(), np.asarray(y).copy()))
        c = self.config.in_channels
        chan = np.arange(2 * c, dtype=np.float32)[None, :, None, None]
        lab = np.asarray(y, dtype=np.float32)[:, None, None, None]
        eps = np.float32(0.1) * x + np.float32(0.01) * (lab + 1) * (chan[:, :c] + 1)
        v = np.broadcast_to(np.tanh(np.float32(0.05) * (lab + chan[:, c:])), x.shape)
        return np.concatenate([eps, v], axis=1).astype(np.float32)


class RecordingRng:
    """Wraps default_rng to keep every generator sample() creates."""

    def __init__(self, real):
        self.real = real
        self.made = []

    def __call__(self, seed=None):
        g = self.real(seed)
        self.made.append(g)
        return g


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("seeding", ["seed", "seeds"])
def test_rng_contract_one_stream_per_image_initial_noise_then_one_draw_per_step(monkeypatch, sampler, steps,
                                                                                seeding):
    rec = RecordingRng(np.random.default_rng)
    monkeypatch.setattr(np.random, "default_rng", rec)
    model = RecordingModel()
    kw = dict(seed=123) if seeding == "seed" else dict(seeds=[77, 5])
    want_seeds = [123, 124] if seeding == "seed" else [77, 5]
    sample(model, [1, 2], steps=steps, sampler=sampler, cfg_scale=1.0, **kw)
    assert len(rec.made) == 2  # one generator per image, made from that image's seed alone

    image = (4, 8, 8)
    refs = [rec.real(s) for s in want_seeds]
    first = np.stack([r.standard_normal(image, dtype=np.float32) for r in refs])
    assert np.array_equal(model.calls[0][0], first)
    for r in refs:
        for _ in range(steps):
            r.standard_normal(image, dtype=np.float32)
    # each image's generator has made exactly steps + 1 draws: same state, same next draw
    for made, r in zip(rec.made, refs):
        assert made.bit_generator.state == r.bit_generator.state
        assert np.array_equal(made.standard_normal(3), r.standard_normal(3))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
def test_image_seed_k_is_seed_plus_k_and_an_image_does_not_depend_on_its_batch(sampler):
    model = RecordingModel()
    batch = sample(model, [3, 7, 1], steps=4, sampler=sampler, cfg_scale=4.0, seed=5)
    assert np.array_equal(batch[1], sample(model, [7], steps=4, sampler=sampler, cfg_scale=4.0, seed=6)[0])
    assert np.array_equal(batch[1], sample(model, [7], steps=4, sampler=sampler, cfg_scale=4.0, seeds=[6])[0])
    mixed = sample(model, [9, 1, 3], steps=4, sampler=sampler, cfg_scale=4.0, seeds=[40, 7, 5])
    assert np.array_equal(mixed[2], batch[0])
    assert not np.array_equal(batch[0], batch[2])


@pytest.mark.parametrize("kw, match", [
    (dict(seeds=[1]), "one seed per image"), (dict(seeds=[1, 2, 3]), "one seed per image"),
    (dict(seeds=[1, -2]), "every seed"), (dict(seeds=[1, True]), "every seed"), (dict(seeds=[1, 2.0]), "every seed"),
    (dict(seeds=[1, 2**64]), "every seed"), (dict(seeds=7), "list of integers"), (dict(seeds="12"), "list of"),
    (dict(seed=-1), "seed must be"), (dict(seed=2**64 - 1), "seed must be"), (dict(seed=1.5), "seed must be"),
])
def test_bad_seeds_are_refused(kw, match):
    with pytest.raises(InputError, match=match):
        sample(RecordingModel(), [1, 2], steps=2, sampler="ddim", cfg_scale=1.0, **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
def test_model_sees_original_timesteps_in_descending_order(sampler):
    model = RecordingModel()
    sample(model, [3], steps=10, sampler=sampler, cfg_scale=1.0, seed=0)
    seen = [int(t[0]) for _, t, _ in model.calls]
    assert seen == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for x, t, y in model.calls:
        assert x.dtype == np.float32 and t.dtype == np.int64 and y.tolist() == [3]


def test_same_seed_same_latents_and_other_seed_differs():
    a = sample(RecordingModel(), [1], steps=4, seed=7, cfg_scale=1.0)
    b = sample(RecordingModel(), [1], steps=4, seed=7, cfg_scale=1.0)
    c = sample(RecordingModel(), [1], steps=4, seed=8, cfg_scale=1.0)
    assert a.dtype == np.float32 and a.shape == (1, 4, 8, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ddpm_step_matches_the_posterior_formulas():
    """Two DDPM steps by hand in float64 against the sampler (float32): close, not bit-equal."""
    model = RecordingModel()
    out = sample(model, [4], steps=2, sampler="ddpm", cfg_scale=1.0, seed=3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32).astype(np.float64)
    s = Schedule.create(2)
    for j in (1, 0):
        m = model(x.astype(np.float32), np.array([s.timesteps[j]]), np.array([4])).astype(np.float64)
        noise = rng.standard_normal((1, 4, 8, 8), dtype=np.float32).astype(np.float64)
        eps, v = m[:, :4], m[:, 4:]
        x0 = np.sqrt(1 / s.alphas_cumprod[j]) * x - np.sqrt(1 / s.alphas_cumprod[j] - 1) * eps
        mean = s.posterior_mean_coef1[j] * x0 + s.posterior_mean_coef2[j] * x
        frac = (v + 1) / 2
        log_var = frac * np.log(s.betas[j]) + (1 - frac) * s.posterior_log_variance_clipped[j]
        x = mean + (np.exp(0.5 * log_var) * noise if s.timesteps[j] != 0 else 0)
    np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_the_formulas(eta):
    model = RecordingModel()
    out = sample(model, [6], steps=3, sampler="ddim", eta=eta, cfg_scale=1.0, seed=5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32).astype(np.float64)
    s = Schedule.create(3)
    for j in (2, 1, 0):
        eps = model(x.astype(np.float32), np.array([s.timesteps[j]]), np.array([6]))[:, :4].astype(np.float64)
        noise = rng.standard_normal((1, 4, 8, 8), dtype=np.float32).astype(np.float64)
        abar, abar_prev = s.alphas_cumprod[j], s.alphas_cumprod_prev[j]
        x0 = np.sqrt(1 / abar) * x - np.sqrt(1 / abar - 1) * eps
        eps2 = (np.sqrt(1 / abar) * x - x0) / np.sqrt(1 / abar - 1)
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        x = x0 * np.sqrt(abar_prev) + np.sqrt(1 - abar_prev - sigma ** 2) * eps2 + (sigma * noise if j else 0)
    np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-5)


# --- callback ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
def test_callback_runs_once_per_step_with_the_current_latents(sampler):
    seen = []
    out = sample(RecordingModel(), [1], steps=6, sampler=sampler, cfg_scale=1.0, seed=0,
                 callback=lambda i, n, z: seen.append((i, n, z.copy())))
    assert [(i, n) for i, n, _ in seen] == [(i, 6) for i in range(6)]
    assert np.array_equal(seen[-1][2], out)
    assert all(z.shape == (1, 4, 8, 8) and z.dtype == np.float32 for _, _, z in seen)


def test_raising_in_the_callback_cancels_sampling():
    class Cancelled(Exception):
        pass

    def cancel_at_2(i, n, z):
        if i == 2:
            raise Cancelled

    model = RecordingModel()
    with pytest.raises(Cancelled):
        sample(model, [1], steps=10, cfg_scale=1.0, seed=0, callback=cancel_at_2)
    assert len(model.calls) == 3


# --- classifier-free guidance --------------------------------------------------------------------


@pytest.mark.parametrize("guided", [1, 3, 4])
def test_guidance_mixes_only_the_guided_channels(guided):
    model = RecordingModel(guided_channels=guided)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    labels = np.array([2, 5])
    out = guided_model_output(model, x, 500, labels, cfg_scale=4.0)
    # one model call on [x, x] with labels [y, null]
    assert len(model.calls) == 1
    xx, tt, yy = model.calls[0]
    assert np.array_equal(xx, np.concatenate([x, x])) and tt.tolist() == [500] * 4 and yy.tolist() == [2, 5, 10, 10]
    cond = model(x, np.full(2, 500), labels)
    uncond = model(x, np.full(2, 500), np.full(2, 10))
    expected = cond.copy()
    expected[:, :guided] = uncond[:, :guided] + np.float32(4.0) * (cond[:, :guided] - uncond[:, :guided])
    assert np.array_equal(out, expected)
    assert np.array_equal(out[:, guided:], cond[:, guided:])
    assert not np.array_equal(out[:, :guided], cond[:, :guided])


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_no_guidance_at_scale_up_to_one(scale):
    model = RecordingModel()
    x = np.ones((1, 4, 8, 8), np.float32)
    out = guided_model_output(model, x, 10, np.array([1]), cfg_scale=scale)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 1
    assert np.array_equal(out, model(x, np.array([10]), np.array([1])))


def test_sample_with_guidance_doubles_the_batch():
    model = RecordingModel()
    sample(model, [1, 2, 3], steps=2, cfg_scale=1.5, seed=0)
    assert all(x.shape[0] == 6 and y.tolist() == [1, 2, 3, 10, 10, 10] for x, _, y in model.calls)


# --- argument checks (with the real model: it owns the label checks) ----------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.conftest import build_model_file

    path = build_model_file(tmp_path_factory.mktemp("samplers"))
    return terdit_edge.load_model(path, backend="numpy", threads=1)


def test_real_model_samples_with_every_sampler(tiny_model):
    for sampler in ("ddpm", "ddim", "dpm++2m", "unipc"):
        z = sample(tiny_model, [0, 9], steps=3, sampler=sampler, cfg_scale=4.0, seed=1)
        assert z.shape == (2, 4, 8, 8) and z.dtype == np.float32 and np.isfinite(z).all()


@pytest.mark.parametrize("labels,match", [
    ([10], "out of range"), ([0, 1000], "out of range"), ([-1], "out of range"),
    ([1.5], "integers"), ([1.0], "integers"), (["a"], "integers"), ([True], "integers"),
    ([], "non-empty"), ([[1, 2]], "1-D"), (3, "1-D"),
])
def test_bad_class_labels(tiny_model, labels, match):
    with pytest.raises(InputError, match=match):
        sample(tiny_model, labels, steps=2, seed=0)


# None: the default; a list: timesteps (distinct, 0..999)
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, "ten", [10, 10], [1000], [], "ddim37", True])
def test_bad_steps(tiny_model, steps):
    with pytest.raises(InputError, match="steps|ddim"):
        sample(tiny_model, [1], steps=steps, seed=0)


def test_integer_like_steps_are_accepted(tiny_model):
    a = sample(tiny_model, [1], steps=3, seed=0)
    for steps in (np.int64(3), "3"):
        assert np.array_equal(sample(tiny_model, [1], steps=steps, seed=0), a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "unknown sampler"), (dict(sampler=""), "unknown sampler"),  # None: the default
    (dict(cfg_scale=-0.5), "cfg_scale"), (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(cfg_scale=float("inf")), "cfg_scale"), (dict(cfg_scale="4"), "cfg_scale"),
    (dict(eta=-1.0), "eta"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed="0"), "seed"), (dict(seed=None), "seed"),
    (dict(seed=True), "seed"),
])
def test_bad_sampler_arguments(tiny_model, kwargs, match):
    with pytest.raises(InputError, match=match):
        sample(tiny_model, [1], **{"steps": 2, **kwargs})


def test_argument_errors_are_terdit_errors_and_value_errors(tiny_model):
    with pytest.raises(TerditError):
        sample(tiny_model, [99], steps=2)
    with pytest.raises(ValueError):
        sample(tiny_model, [1], steps=0)


def test_sampler_aliases(tiny_model):
    a = sample(tiny_model, [1], steps=3, sampler="dpm++2m", seed=0)
    for alias in ("DPM++2M", "dpmpp2m", "dpm-solver++"):
        assert np.array_equal(sample(tiny_model, [1], steps=3, sampler=alias, seed=0), a)
    u = sample(tiny_model, [1], steps=4, sampler="unipc", seed=0)
    for alias in ("UniPC", "unipc-bh2", "unipc2m", "uni-pc"):
        assert np.array_equal(sample(tiny_model, [1], steps=4, sampler=alias, seed=0), u)


# --- guidance interval ---------------------------------------------------------------------------


def _guided_steps(model) -> list[int]:
    """Timesteps of the calls that ran guidance partners (batch 2B with null labels)."""
    return [int(t[0]) for _, t, y in model.calls if (y == model.null_label).any()]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
def test_guidance_interval_guides_exactly_the_steps_inside_it(sampler):
    model = RecordingModel()
    sample(model, [1, 2], steps=10, sampler=sampler, cfg_scale=4.0, seed=0, guidance_interval=(300, 700))
    assert _guided_steps(model) == [666, 555, 444, 333]
    for x, t, _ in model.calls:  # outside the interval: the conditional half alone
        assert x.shape[0] == (4 if int(t[0]) in (666, 555, 444, 333) else 2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
def test_full_interval_is_plain_guided_sampling_and_an_empty_one_is_unguided(sampler):
    kw = dict(steps=6, sampler=sampler, seed=4, eta=1.0)
    plain = sample(RecordingModel(), [1, 2], cfg_scale=4.0, **kw)
    assert np.array_equal(sample(RecordingModel(), [1, 2], cfg_scale=4.0, guidance_interval=(0, 999), **kw), plain)
    model = RecordingModel()
    none_guided = sample(model, [1, 2], cfg_scale=4.0, guidance_interval=(1, 150), **kw)  # steps: 999..0 by 200
    assert _guided_steps(model) == []
    assert np.array_equal(none_guided, sample(RecordingModel(), [1, 2], cfg_scale=1.0, **kw))


def test_guidance_interval_on_the_bundled_model_is_bit_exact_at_its_ends():
    """With a real (batch-invariant) model: the conditional half run alone equals it beside its partner."""
    model = terdit_edge.load_model(Pipeline.load().path, threads=2)
    kw = dict(steps=8, sampler="ddim", seed=3)
    plain = sample(model, [3, 8], cfg_scale=4.0, **kw)
    assert np.array_equal(sample(model, [3, 8], cfg_scale=4.0, guidance_interval=(0, 999), **kw), plain)
    assert np.array_equal(sample(model, [3, 8], cfg_scale=4.0, guidance_interval=(500, 501), **kw),
                          sample(model, [3, 8], cfg_scale=1.0, **kw))
    part = sample(model, [3, 8], cfg_scale=4.0, guidance_interval=(0, 500), **kw)
    assert not np.array_equal(part, plain)


@pytest.mark.parametrize("interval", [(5, 2), (-1, 10), (0, 1000), (0,), "0,9", (0, float("nan")), (True, 5)])
def test_bad_guidance_intervals_are_refused(interval):
    with pytest.raises(InputError, match="guidance_interval"):
        sample(RecordingModel(), [1], steps=2, cfg_scale=4.0, guidance_interval=interval)


# --- the sampler registry --------------------------------------------------------------------------


def test_registry_names_defaults_and_aliases():
    assert tuple(SAMPLER_REGISTRY) == SAMPLERS == ("ddpm", "ddim", "dpm++2m", "unipc")
    assert SAMPLER_REGISTRY["ddpm"].default_steps == 250 and SAMPLER_REGISTRY["ddim"].default_steps == 50
    assert sampler_class("DPM-Solver++") is SAMPLER_REGISTRY["dpm++2m"]
    with pytest.raises(InputError, match="choose one of"):
        sampler_class("euler")
    model = RecordingModel()
    sample(model, [1], sampler="ddim", cfg_scale=1.0)  # steps=None: the sampler's default
    assert len(model.calls) == 50


def test_a_registered_sampler_is_usable_by_name_everywhere(monkeypatch):
    """Adding a sampler is one class and one registration: sample() and the CLI pick it up."""
    monkeypatch.setattr(diffusion, "SAMPLER_REGISTRY", dict(SAMPLER_REGISTRY))
    monkeypatch.setattr(diffusion, "_SAMPLER_ALIASES", dict(diffusion._SAMPLER_ALIASES))

    @diffusion.register_sampler
    class X0(diffusion.Sampler):
        """Jumps to the predicted x0 at once (a test sampler)."""
        name = "x0-test"
        default_steps = 3

        def step(self, j, x, model_out, noise):
            return diffusion.predict_x0(self.s, j, x, model_out[:, :x.shape[1]]).astype(np.float32)

    model = RecordingModel()
    out = sample(model, [2], sampler="x0-test", cfg_scale=1.0, seed=1)
    assert len(model.calls) == 3 and out.shape == (1, 4, 8, 8) and np.isfinite(out).all()
    from terdit_edge.frontends.cli import build_parser
    args = build_parser().parse_args(["generate", "--sampler", "x0-test"])
    assert args.sampler == "x0-test"
