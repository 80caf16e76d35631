"""Doing less work per image (issue 24): the step cache, guidance reuse, named schedules and speed presets.

Real behaviour on the bundled (trained) digits model: off is bit-identical to before; "compute every
step" settings are bit-identical to exact; on, fewer network evaluations and images near the exact
ones; an image's bytes do not depend on its batch partners, with per-image adaptive decisions.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from terdit_edge.diffusion import SAMPLER_REGISTRY, SAMPLERS, named_schedules, respaced_timesteps, sample, schedule_timesteps
from terdit_edge.errors import InputError
from terdit_edge.settings import GenerationSettings as G
from terdit_edge.speed import PRESETS, apply_preset
from terdit_edge.stepcache import forecast, lagrange_weights, parse_spec

LABELS = [0, 3, 7, 9]


@pytest.fixture(scope="module")
def pipe():
    from terdit_edge.pipeline import Pipeline

    return Pipeline.load(threads=1)


def run(pipe, **kw):
    stats = {}
    kw.setdefault("sampler", "dpm++2m")
    kw.setdefault("steps", 20)
    x = sample(pipe.model, LABELS, seed=11, stats=stats, **kw)
    return x, stats


def rel(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_off_and_every_step_computed_are_bit_identical_to_exact(pipe):
    exact, st = run(pipe)
    assert st == {"network_evals": 2 * 20 * len(LABELS), "forecast_evals": 0, "uncond_reused": 0,
                  "per_step": [(2 * len(LABELS), 0)] * 20}
    for kw in ({"cache": None}, {"cache": "off"}, {"cache": "fixed:1"}, {"cache": "adaptive:0"},
               {"guidance_reuse": "fixed:1"}, {"speed": "exact"}, {"cache": "fixed:1", "guidance_reuse": "fixed:1",
                                                                    "guidance_interval": (100, 700)}):
        x, _ = run(pipe, **kw)
        ref = exact if "guidance_interval" not in kw else run(pipe, guidance_interval=(100, 700))[0]
        assert np.array_equal(x, ref), kw


@pytest.mark.parametrize("kw,max_rel", [
    ({"cache": "fixed:2"}, 0.15), ({"cache": "fixed:3,order=2"}, 0.4), ({"cache": "fixed:2,reuse"}, 0.3),
    ({"cache": "adaptive:0.2"}, 0.2), ({"guidance_reuse": "fixed:2"}, 0.15), ({"guidance_reuse": "fixed:3,order=0"}, 0.3),
])
def test_fewer_network_evaluations_and_near_the_exact_images(pipe, kw, max_rel):
    exact, _ = run(pipe)
    x, st = run(pipe, **kw)
    assert st["network_evals"] < 2 * 20 * len(LABELS)
    assert st["network_evals"] + st["forecast_evals"] + st["uncond_reused"] == 2 * 20 * len(LABELS)
    assert np.all(np.isfinite(x)) and rel(x, exact) < max_rel, rel(x, exact)
    # a far cruder setting is much further away: the bound above means something
    crude, _ = run(pipe, steps=4)
    assert rel(crude, exact) > max_rel / 3


def test_fixed_policy_counts():
    spec = parse_spec("fixed:3,first=2,last=1")
    full = [spec.fixed_full(i, 10) for i in range(10)]
    assert full == [True, True, True, False, False, True, False, False, True, True]


@pytest.mark.parametrize("kw", [{"cache": "adaptive:0.25"}, {"cache": "fixed:2", "guidance_reuse": "fixed:2"},
                                {"cache": "adaptive:0.2,order=2", "guidance_interval": (0, 600)},
                                {"speed": "fast"}])
def test_an_image_does_not_depend_on_its_batch_partners(pipe, kw):
    kw = {"sampler": "dpm++2m", "steps": 12, **kw}
    if "speed" in kw:
        kw.pop("steps"), kw.pop("sampler")
    batch = sample(pipe.model, LABELS, seeds=[5, 6, 7, 8], **kw)
    for k in (0, 2):
        alone = sample(pipe.model, [LABELS[k]], seeds=[5 + k], **kw)
        assert np.array_equal(alone[0], batch[k]), k


def test_adaptive_decisions_are_per_image(pipe):
    st1, st4 = {}, {}
    sample(pipe.model, [1], seeds=[3], steps=20, sampler="dpm++2m", cache="adaptive:0.2", stats=st1)
    sample(pipe.model, [1, 1, 1, 1], seeds=[3, 3, 3, 3], steps=20, sampler="dpm++2m", cache="adaptive:0.2", stats=st4)
    assert st4["network_evals"] == 4 * st1["network_evals"] and st1["forecast_evals"] > 0


def test_forecast_is_the_polynomial_through_the_cached_steps():
    ts = [500.0, 600.0, 700.0]
    vals = [np.full(3, 2.0 * t - 1.0, dtype=np.float32) for t in ts]
    hist = list(zip(ts, vals))
    assert np.allclose(forecast(hist[:2], 400.0), 799.0)  # order 1: exact on a line
    assert np.allclose(forecast(hist[:1], 400.0), 999.0)  # order 0: reuse
    assert np.allclose(lagrange_weights(ts, 450.0).sum(), 1.0)


def test_spec_strings_are_checked_and_normalised():
    assert parse_spec("fixed:3").text() == "fixed:3,order=1,first=2,last=1"
    assert parse_spec("Adaptive:0.10,max=2,reuse").text() == "adaptive:0.1,order=0,first=2,last=1,max=2"
    assert parse_spec("off") is None and parse_spec(None) is None
    for bad, msg in (("fixed:0", "interval"), ("fixed:2,order=9", "order"), ("sometimes", "must look like"),
                     ("fixed:2,max=3", "must look like"), ("adaptive:-1", "threshold"), (3, "spec string")):
        with pytest.raises(InputError, match=msg):
            parse_spec(bad)
    with pytest.raises(InputError, match="guidance_reuse must look like"):
        parse_spec("adaptive:0.1", "guidance_reuse", kinds=("fixed",))


def test_named_schedules_are_timestep_lists(pipe):
    assert "_about" not in named_schedules()
    for name, entry in named_schedules().items():
        ts = schedule_timesteps(name)
        assert ts == sorted(set(ts)) and ts[-1] == 999 and 0 <= ts[0], name
        assert respaced_timesteps(ts) == ts and entry["sampler"] in SAMPLER_REGISTRY
        assert name == f"{entry['sampler']}-{len(ts)}", name
    assert {f"{s}-{n}" for s in ("dpm++2m", "unipc") for n in (4, 5, 8, 10, 15)} <= set(named_schedules())
    name = next(iter(named_schedules()))
    a, _ = run(pipe, steps=None, schedule=name)
    b, _ = run(pipe, steps=schedule_timesteps(name))
    assert np.array_equal(a, b)
    with pytest.raises(InputError, match="give no steps"):
        run(pipe, steps=3, schedule=name)
    with pytest.raises(InputError, match="unknown schedule"):
        run(pipe, steps=None, schedule="nope")


def test_speed_presets_fill_in_and_explicit_settings_win(pipe):
    assert PRESETS["exact"] == {} and apply_preset("exact", sampler=None, steps=None, schedule=None, cache=None,
                                                   guidance_reuse=None)["cache"] is None
    bal = G(speed="balanced")
    assert bal == G().replace(speed="balanced")
    for k, v in PRESETS["balanced"].items():
        assert getattr(bal, k) == (v if k != "cache" and k != "guidance_reuse" else parse_spec(v) and parse_spec(v).text())
    # explicit wins, in the same call, from JSON and from the command line
    s = G().replace(speed="fast", sampler="ddim", cache="off")
    assert s.sampler == "ddim" and s.cache is None
    assert s.guidance_reuse == parse_spec(PRESETS["fast"]["guidance_reuse"]).text()
    s = G().replace(speed="balanced", steps=12)
    assert s.schedule is None and s.step_spec == 12
    assert G.from_json({"speed": "balanced", "steps": 12}) == s
    assert G.from_json(bal.to_json()) == bal
    # the library: sample(speed=...) is the settings' run
    a = sample(pipe.model, [2], seeds=[4], speed="balanced")
    b = sample(pipe.model, [2], seeds=[4], **bal.sample_kwargs())
    assert np.array_equal(a, b)
    # the presets do the promised amount of work (network evaluations against DPM++ 20, guided)
    for speed, at_least in (("balanced", 3.0), ("fast", 5.0)):
        st = {}
        sample(pipe.model, [2], seeds=[4], speed=speed, stats=st)
        assert 40 / st["network_evals"] >= at_least, (speed, st)


def test_settings_identity_metadata_and_batch_key():
    s = G(steps=10, sampler="dpm++2m", cache="fixed:2", guidance_reuse="fixed:3")
    ident = s.identity()
    assert ident["cache"] == "fixed:2,order=1,first=2,last=1" and ident["guidance_reuse"].startswith("fixed:3")
    assert "schedule" not in ident and "speed" not in ident  # optional: absent while unset
    assert s.batch_key() != s.replace(cache=None).batch_key() != s.replace(cache="fixed:3").batch_key()
    tail = dict(s.png_items()[1])
    assert tail["cache"] == ident["cache"]
    assert G().identity() == {"steps": 250, "sampler": "ddpm", "cfg_scale": 4.0, "eta": 0.0, "activations": "fp32"}
    for name, value, msg in (("cache", "sometimes", "cache must look like"), ("speed", "ludicrous", "speed must be"),
                             ("schedule", "nope", "unknown schedule"),
                             ("guidance_reuse", "adaptive:0.1", "guidance_reuse must look like")):
        with pytest.raises(InputError, match=msg):
            G(**{name: value})
        with pytest.raises(InputError, match=msg):
            G.from_json({name: value})
    name = next(iter(named_schedules()))
    with pytest.raises(InputError, match="give no steps"):
        G(schedule=name, steps=3)
    assert G(schedule=name).replace(steps=7).schedule is None  # new steps replace the schedule


def test_cli_generate_speed_and_info_lists_presets(tmp_path):
    out = tmp_path / "a.png"
    r = subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", "generate", "--class", "3", "--speed",
                        "fast", "--out", str(out), "--no-progress", "--threads", "1"], capture_output=True, text=True)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip("cli not runnable as a module")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    meta = Image.open(out).text
    assert meta["speed"] == "fast" and meta["schedule"] == PRESETS["fast"]["schedule"]
    assert meta["guidance_reuse"] == parse_spec(PRESETS["fast"]["guidance_reuse"]).text() and "cache" not in meta
    r = subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", "info", "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info["speed_presets"]) == {"exact", "balanced", "fast"}
    # the names --sampler and --schedule take, schedules by solver and step count
    assert info["samplers"] == list(SAMPLERS) and "unipc" in info["samplers"]
    assert sorted(info["schedules"]) == sorted(named_schedules()) and "dpm++2m-5" in info["schedules"]
    assert info["schedules"].index("dpm++2m-4") < info["schedules"].index("dpm++2m-15") < info["schedules"].index(
        "unipc-4")


def test_server_requests_and_sampling_jobs_carry_the_settings(pipe):
    from terdit_edge.frontends.server.jobs import Limits
    from terdit_edge.frontends.server.validate import ApiError, job_params, openai_params
    from terdit_edge.scale.job import JobSpec

    base = G(activations="fp32")
    p = job_params({"class": 3, "speed": "balanced", "guidance_reuse": "fixed:2"}, pipe, Limits(), base)
    assert p.settings.schedule == PRESETS["balanced"]["schedule"] and p.settings.guidance_reuse.startswith("fixed:2,")
    p = openai_params({"prompt": "class:3", "cache": "fixed:2"}, pipe, Limits(), base)
    assert p.settings.cache == "fixed:2,order=1,first=2,last=1"
    with pytest.raises((ApiError, InputError)):
        job_params({"class": 3, "cache": "often"}, pipe, Limits(), base)
    a = JobSpec(model_path=pipe.path, n=4, settings=G(sampler="dpm++2m", steps=10, cache="adaptive:0.2")).prepare()
    b = JobSpec(model_path=pipe.path, n=4, settings=G(sampler="dpm++2m", steps=10)).prepare()
    assert a.identity()["cache"].startswith("adaptive:0.2") and "cache" not in b.identity()


def test_edits_take_a_schedule_and_refuse_the_cache(pipe):
    three = (pipe([3], seeds=[1], steps=5, sampler="dpm++2m", output="np", progress=False)[0, :, :, 0] * 255).astype(
        np.uint8)
    a = pipe.edit(three, [8], strength=0.7, sampler="dpm++2m", schedule="dpm++2m-5", seeds=[2], output="np")
    b = pipe.edit(three, [8], strength=0.7, sampler="dpm++2m", steps=schedule_timesteps("dpm++2m-5"), seeds=[2],
                  output="np")
    assert np.array_equal(a, b)
    for kw in ({"cache": "fixed:2"}, {"guidance_reuse": "fixed:2"}):
        with pytest.raises(InputError, match="do not support"):
            pipe.edit(three, [8], steps=5, **kw)
