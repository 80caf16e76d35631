"""GenerationSettings (terdit_edge/settings.py): the one declaration of every generation setting.

Checks, normalisation, JSON and command-line round trips, the job identity and PNG metadata of
today's settings (so old manifests resume and old images keep their bytes), the batch key, and
that every front-end takes its options and request fields from the table, not from a list of its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from importlib import resources

import numpy as np
import pytest

from terdit_edge.errors import InputError
from terdit_edge.frontends.cli import build_parser
from terdit_edge.settings import SCOPES, SETTINGS, GenerationSettings

G = GenerationSettings

# (setting, bad value, words the message must hold): the same rule from Python, JSON and the command line
BAD = [
    ("steps", 0, "at least 1"), ("steps", 1001, "at most 1000"), ("steps", "fast", "steps must be"),
    ("steps", True, "steps must be"), ("steps", "ddim7x", "steps must be"), ("steps", "ddim999", "no integer stride"),
    ("sampler", "euler", "unknown sampler"), ("sampler", 3, "unknown sampler"),
    ("cfg_scale", -1, "cfg_scale must be in 0..100"), ("cfg_scale", 101, "cfg_scale must be in"),
    ("cfg_scale", "4", "finite number"), ("cfg_scale", float("nan"), "finite number"),
    ("eta", float("inf"), "finite number"), ("eta", 11, "eta must be in 0..10"),
    ("activations", "int4", "activations must be one of"),
    ("guidance_interval", [5], "[LO, HI]"), ("guidance_interval", [500, 100], "lo <= hi"),
    ("guidance_interval", [0, 1000], "lo <= hi <= 999"), ("guidance_interval", [0.5, 9], "[LO, HI]"),
    ("seed", -1, "seed must be in"), ("seed", 2**64, "seed must be in"), ("seed", 1.0, "seed must be in"),
    ("seeds", ["a"], "every seed"), ("seeds", 5, "seeds must be a list"), ("seeds", [], "at least one"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_raises_input_error_naming_the_problem(name, value, message):
    with pytest.raises(InputError) as e:
        G(**{name: value})
    assert message in str(e.value)
    with pytest.raises(InputError, match=None) as e:
        G.from_json({name: value})
    assert message in str(e.value)


def test_values_are_normalised():
    s = G(steps=10, sampler="DPM-Solver++", cfg_scale=4, eta=0, guidance_interval=[100, 800], seeds=[3, 4])
    assert s.sampler == "dpm++2m" and type(s.cfg_scale) is float and type(s.eta) is float
    assert s.guidance_interval == (100, 800) and s.seeds == (3, 4)
    assert G().step_spec == 250 and G(sampler="ddim").step_spec == 50 and G(steps="ddim25").n_steps == 25
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3  # frozen: one value can be shared by threads and used as a key


def test_seed_and_seeds_are_exclusive_and_give_per_image_seeds():
    with pytest.raises(InputError, match="not both"):
        G(seed=1, seeds=[2])
    assert G().image_seeds(3) == [0, 1, 2] and G(seed=7).image_seeds(2) == [7, 8]
    assert G().image_seeds(2, default_seed=40) == [40, 41]
    assert G(seeds=[9, 1]).image_seeds(2) == [9, 1]
    with pytest.raises(InputError, match="list of 3"):
        G(seeds=[9, 1]).image_seeds(3)
    with pytest.raises(InputError, match="seed must be in"):
        G(seed=2**64 - 1).image_seeds(2)
    # replacing one by the other drops the first, as the command line's exclusive options do
    assert G(seed=5).replace(seeds=[1]).seed is None and G(seeds=[1]).replace(seed=5).seeds is None
    with pytest.raises(InputError, match="unknown setting"):
        G().replace(colour="red")


def test_json_round_trip_and_unknown_scopes_ignored():
    s = G(steps="ddim25", sampler="ddim", cfg_scale=1.5, eta=0.3, activations="int8", guidance_interval=(0, 500),
          seeds=(1, 2))
    assert G.from_json(json.loads(json.dumps(s.to_json()))) == s
    base = G(activations="int8")
    req = G.from_json({"steps": 4, "activations": "fp32"}, base=base, scopes=("sampling", "seed"))
    assert req.activations == "int8" and req.steps == 4  # a request cannot change the model settings


def test_command_line_round_trip_through_the_generate_parser():
    args = build_parser().parse_args(["generate", "--steps", "ddim25", "--sampler", "ddim", "--cfg", "1.5",
                                      "--eta", "0.3", "--activations", "int8", "--guidance-interval", "0,500",
                                      "--seeds", "1,2"])
    assert G.from_args(args) == G(steps="ddim25", sampler="ddim", cfg_scale=1.5, eta=0.3, activations="int8",
                                  guidance_interval=(0, 500), seeds=(1, 2))
    assert G.from_args(build_parser().parse_args(["generate"])) == G()


@pytest.mark.parametrize("argv,message", [
    (["--cfg", "-1"], "cfg_scale must be in"), (["--steps", "0"], "at least 1"),
    (["--guidance-interval", "5"], "LO"), (["--seeds", "1,,2"], "comma-separated"),
    (["--sampler", "euler"], "unknown sampler"), (["--activations", "int4"], "activations must be"),
    (["--seed", "1", "--seeds", "2"], "not allowed with"),
])
def test_bad_options_exit_2_with_the_settings_message(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_front_end_takes_its_options_from_the_table():
    """generate: every setting; sample: all but the seeds (a job derives them); serve: the model ones."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {name: {a.dest for a in p._actions} for name, p in sub.choices.items()}
    for command, scopes in (("generate", SCOPES), ("sample", ("model", "sampling")), ("serve", ("model",))):
        names = {s.name for s in SETTINGS if s.scope in scopes}
        others = {s.name for s in SETTINGS} - names
        assert names <= dests[command] and not others & dests[command], command
    from terdit_edge.kernels import backend_names
    for command in ("generate", "sample", "serve"):
        backend = next(a for a in sub.choices[command]._actions if a.dest == "backend")
        assert tuple(backend.choices) == ("auto", *backend_names()), command


def test_every_setting_is_a_field_and_the_server_documents_the_request_ones():
    assert [f.name for f in dataclasses.fields(G)] == [s.name for s in SETTINGS]
    spec = json.loads(resources.files("terdit_edge.frontends.server").joinpath("openapi.json").read_text("utf-8"))
    schemas = spec["components"]["schemas"]
    for s in SETTINGS:
        documented = s.name in schemas["JobRequest"]["properties"]
        assert documented == (s.scope != "model"), s.name  # requests set sampling and seed settings only
        assert documented == (s.name in schemas["ImagesRequest"]["properties"]), s.name


def test_identity_and_png_metadata_of_the_settings_before_issue_26_are_unchanged():
    """Jobs and images made before settings.py keep their identity (resume) and PNG bytes."""
    assert G(steps=40, sampler="ddim").identity() == {"steps": 40, "sampler": "ddim", "cfg_scale": 4.0, "eta": 0.0,
                                                      "activations": "fp32"}
    assert G(guidance_interval=(0, 500)).identity()["guidance_interval"] == [0, 500]
    assert G(seed=3).identity() == G().identity()  # seeds are not settings of a job (it derives them)
    head, tail = G(steps="ddim25", guidance_interval=(1, 2)).png_items()
    assert head == [("steps", "ddim25"), ("sampler", "ddpm"), ("cfg", "4.0"), ("eta", "0.0"), ("activations", "fp32")]
    assert tail == [("guidance_interval", "1,2")] and G().png_items()[1] == []


def test_png_metadata_keys_keep_their_order():
    from terdit_edge.pngmeta import generation_metadata

    meta = generation_metadata("m.tdit", [3], [7], G(guidance_interval=(1, 2)))
    assert list(meta) == ["model", "class", "seed", "index", "steps", "sampler", "cfg", "eta", "activations",
                          "version", "guidance_interval"]


def test_batch_key_separates_every_setting_but_the_seeds():
    base = G(sampler="ddim", steps=10)
    assert base.batch_key() == base.replace(seed=4).batch_key() == base.replace(seeds=[1, 2]).batch_key()
    for change in ({"steps": 11}, {"sampler": "dpm++2m"}, {"cfg_scale": 1.0}, {"eta": 0.5},
                   {"guidance_interval": (0, 500)}, {"activations": "int8"}):
        assert base.replace(**change).batch_key() != base.batch_key(), change
    assert G(steps=None).batch_key() == G(steps=250).batch_key()  # the default step count is the same run
    hash(base.batch_key())


def test_the_pipeline_refuses_settings_of_another_activation_mode():
    from terdit_edge.pipeline import Pipeline

    pipe = Pipeline.load(activations="fp32", threads=1)
    with pytest.raises(InputError, match="activations 'int8'"):
        pipe.latents([1], G(activations="int8", steps=2))
    a = pipe.latents([1, 2], G(steps=3, sampler="ddim", seed=4))
    b = pipe.latents([1, 2], steps=3, sampler="ddim", seed=4)  # keywords are the same settings
    assert (a == b).all()


def test_attention_is_a_model_setting_left_out_of_identity_and_png_at_fp32():
    from terdit_edge.pipeline import Pipeline

    assert G().attention == "fp32"
    with pytest.raises(InputError, match="attention"):
        G(attention="int4")
    base = G(steps=3)
    assert "attention" not in base.identity() and "attention" not in dict(sum(base.png_items(), []))
    s8 = base.replace(attention="int8")
    assert s8.identity()["attention"] == "int8" and ("attention", "int8") in s8.png_items()[1]
    assert s8.model_kwargs() == {"activations": "fp32", "attention": "int8"}
    args = build_parser().parse_args(["generate", "--attention", "int8", "--activations", "int8", "1"])
    assert G.from_args(args).attention == "int8"
    pipe = Pipeline.load(settings=s8, threads=1)
    assert pipe.attention == "int8" and "int8 attention" in pipe.model.backend.describe()
    with pytest.raises(InputError, match="attention 'fp32'"):
        pipe.latents([1], base)
    a = pipe.latents([1], s8)
    f = Pipeline.load(threads=1).latents([1], base)
    assert a.shape == f.shape and (a != f).any()  # another kernel: other numbers, same image size
    assert float(np.linalg.norm(a - f) / np.linalg.norm(f)) < 0.05
