"""Every image reproducible on its own (docs/reproducibility.md).

An image is a pure function of (model file, class, seed, sampler, steps, cfg, eta, activations):
the same bytes whether it is computed alone or in a batch with other classes and seeds, with or
without guidance partners, with 1 or 2 threads, in batches of any size. Checked bit for bit on
every CPU backend in the registry and every activation mode.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from PIL import Image

import terdit_edge
from terdit_edge import Pipeline
from terdit_edge.config import ModelConfig, ffn_hidden_dim
from terdit_edge.format import float_param_shapes, ternary_layer_shapes
from terdit_edge.frontends.cli import main
from terdit_edge.kernels import ACTIVATION_MODES, TernaryWeight, available_backends, backend_names, get_backend
from terdit_edge.model import TernaryDiT
from terdit_edge.packing import padded_k
from tests.conftest import build_model_file, skip_unavailable_backend

CPU_BACKENDS = list(backend_names("cpu"))
LABELS = [3, 7, 1, 0, 9]
SEEDS = [11, 5, 2**40 + 3, 0, 42]


def usable(backend):
    status = available_backends()[backend]
    if status != "ok":
        skip_unavailable_backend(backend, status)


@contextlib.contextmanager
def forced_thread_splits(backend: str, threads: int):
    """With 2 threads, make the C kernels split even these tiny problems across threads, so that the
    2-thread runs really take the multi-thread code paths (their own work splits)."""
    ext = None
    if backend == "cython" and threads > 1:
        from terdit_edge.kernels.cython_backend import _ternary as ext
        ext.set_force_parallel(True)
    try:
        yield
    finally:
        if ext is not None:
            ext.set_force_parallel(False)


@pytest.fixture(scope="module")
def small_latent_model(tmp_path_factory):
    """A random latent model (4 channels, 3 guided) whose widths are not multiples of the packing block."""
    return build_model_file(tmp_path_factory.mktemp("repro"), name="small.tdit")


@pytest.fixture(params=["bundled", "small"])
def model_path(request, small_latent_model):
    return None if request.param == "bundled" else small_latent_model


@pytest.mark.parametrize("activations", ACTIVATION_MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_image_of_a_batch_equals_the_image_made_alone(model_path, backend, activations):
    usable(backend)
    kw = dict(steps=3, sampler="ddpm", cfg_scale=4.0)  # ddpm: uses every step's noise draw
    results = {}
    for threads in (1, 2):
        pipe = Pipeline.load(model_path, backend=backend, activations=activations, threads=threads)
        with forced_thread_splits(backend, threads):
            alone = [pipe.latents([c], seeds=[s], **kw)[0] for c, s in zip(LABELS, SEEDS)]
            for batch_size in (5, 2, 1):
                batch = pipe.latents(LABELS, seeds=SEEDS, batch_size=batch_size, **kw)
                for k in range(len(LABELS)):
                    assert np.array_equal(batch[k], alone[k]), (
                        f"{backend}/{activations}, {threads} threads, batch_size {batch_size}: image {k} "
                        f"differs from the same image made alone (max {np.abs(batch[k] - alone[k]).max():.3g})")
            # the same image beside other classes and seeds, in another position
            other = pipe.latents([5, LABELS[1], 8], seeds=[123, SEEDS[1], 7], batch_size=3, **kw)
            assert np.array_equal(other[1], alone[1])
        results[threads] = np.stack(alone)
    assert np.array_equal(results[1], results[2]), f"{backend}/{activations}: 1 and 2 threads differ"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unguided_images_are_batch_invariant_too(small_latent_model, backend):
    """Without guidance partners (cfg <= 1) the model sees B rows per step instead of 2B."""
    usable(backend)
    for activations in ("fp32", "int8"):
        pipe = Pipeline.load(small_latent_model, backend=backend, activations=activations, threads=2)
        kw = dict(steps=3, sampler="ddim", eta=1.0, cfg_scale=1.0)
        batch = pipe.latents(LABELS, seeds=SEEDS, **kw)
        for k in (0, 3):
            assert np.array_equal(batch[k], pipe.latents([LABELS[k]], seeds=[SEEDS[k]], **kw)[0])


def test_seed_numbers_the_images_of_a_call():
    """pipe([3, 7], seed=5)[1] == pipe([7], seed=6)[0] == pipe([7], seeds=[6])[0], as PNG pixels."""
    pipe = Pipeline.load()
    kw = dict(steps=4, sampler="dpm++2m", cfg_scale=4.0, progress=False)
    pair = pipe([3, 7], seed=5, **kw)
    alone = pipe([7], seed=6, **kw)[0]
    listed = pipe([7], seeds=[6], **kw)[0]
    assert pair[1].tobytes() == alone.tobytes() == listed.tobytes()
    assert pair[0].tobytes() == pipe([3], seed=5, **kw)[0].tobytes()


def test_batch_size_is_checked_and_progress_counts_every_step_of_every_batch():
    pipe = Pipeline.load()
    seen = []
    pipe.latents([1, 2, 3], steps=4, sampler="ddim", seed=0, batch_size=2,
                 callback=lambda i, total, x: seen.append((i, total, x.shape[0])))
    assert [(i, t) for i, t, _ in seen] == [(i, 8) for i in range(8)]
    assert [b for _, _, b in seen] == [2] * 4 + [1] * 4
    for bad in (0, -1, 1.5, True):
        with pytest.raises(terdit_edge.InputError, match="batch_size"):
            pipe.latents([1, 2], steps=2, batch_size=bad)


def test_png_metadata_regenerates_any_image_of_a_grid_alone(tmp_path):
    """The grid's metadata lists every image's class and seed; generating one of them alone with its
    recorded seed gives the same pixels as its cell of the grid."""
    grid = tmp_path / "grid.png"
    assert main(["generate", "--seed", "5", "--steps", "5", "--sampler", "ddim", "--out", str(grid),
                 "--no-progress", "--upscale", "1", "--batch-size", "4"]) == 0
    meta = Image.open(grid).text
    classes = [int(c) for c in meta["class"].split(",")]
    seeds = [int(s) for s in meta["seeds"].split(",")]
    assert seeds == list(range(5, 15)) and classes == list(range(10))
    cells = np.asarray(Image.open(grid))
    side = cells.shape[0]
    for k in (0, 7):
        one = tmp_path / f"one{k}.png"
        assert main(["generate", "--class", str(classes[k]), "--seed", str(seeds[k]), "--steps", "5",
                     "--sampler", "ddim", "--out", str(one), "--no-progress", "--upscale", "1"]) == 0
        im = Image.open(one)
        assert im.text["seed"] == str(seeds[k]) and im.text["class"] == str(classes[k])
        assert np.array_equal(np.asarray(im), cells[:, k * side:(k + 1) * side]), f"image {k}"


def test_separate_files_record_their_own_seed_and_index(tmp_path):
    out = tmp_path / "o.png"
    assert main(["generate", "--class", "4", "--class", "2", "--seeds", "90,17", "--steps", "4", "--sampler",
                 "ddim", "--out", str(out), "--no-progress"]) == 0
    second = Image.open(tmp_path / "o-1.png")
    assert (second.text["class"], second.text["seed"], second.text["index"]) == ("2", "17", "1")
    again = tmp_path / "again.png"
    assert main(["generate", "--class", "2", "--seed", "17", "--steps", "4", "--sampler", "ddim", "--out",
                 str(again), "--no-progress"]) == 0
    assert np.asarray(Image.open(again)).tobytes() == np.asarray(second).tobytes()


@pytest.mark.parametrize("args", [["--seeds", "1,2"], ["--seeds", "1,x"], ["--seeds", "1,-2"],
                                  ["--seed", "1", "--seeds", "3"], ["--batch-size", "0"]])
def test_bad_seed_arguments_are_refused(tmp_path, args, capsys):
    with contextlib.suppress(SystemExit):
        rc = main(["generate", "--class", "1", "--steps", "2", "--out", str(tmp_path / "x.png"), "--no-progress",
                   *args])
        assert rc == 1
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --- the 600M configuration -----------------------------------------------------------------------

def random_600m_model(backend) -> TernaryDiT:
    """TerDiT-600M's shapes (dim 1536, 16 blocks, 32 heads, 256 tokens) with random weights, built in
    memory: packed bytes drawn directly (code 3 mapped to 0), float parameters small."""
    cfg = ModelConfig(dim=1536, n_layers=16, n_heads=32, n_kv_heads=32, ffn_dim=ffn_hidden_dim(1536),
                      cond_dim=1024, input_size=32, num_classes=1000).validate()
    rng = np.random.default_rng(600)
    params = {}
    for name, shape in float_param_shapes(cfg).items():
        base = 1.0 if "norm.weight" in name or name.endswith("adaLN_modulation.2.weight") else 0.0
        params[name] = (base + 0.02 * rng.standard_normal(shape)).astype(np.float32)
    fix = np.arange(256, dtype=np.uint8)
    for b in range(256):  # code 3 (invalid) -> 1 (zero) in each of the four 2-bit fields
        v = b
        for q in range(4):
            if (v >> (2 * q)) & 3 == 3:
                v &= ~(2 << (2 * q))
        fix[b] = v
    ternary = {}
    for name, (n, k) in ternary_layer_shapes(cfg).items():
        packed = fix[rng.integers(0, 256, size=(n, padded_k(k) // 4), dtype=np.uint8)]
        ternary[name] = TernaryWeight(packed=packed, n=n, k=k, alpha=1.5 / np.sqrt(k),
                                      bias=params.pop(name + ".bias", None), name=name)
    return TernaryDiT(cfg, params, ternary, backend)


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_600m_config_step_of_one_image_alone_equals_it_inside_a_batch_of_3(activations):
    """One guided step of TerDiT-600M's shapes: image 1 of a batch of 3 (6 rows with the guidance
    partners) equals the same image run alone (2 rows), bit for bit."""
    backend = "cython" if available_backends()["cython"] == "ok" else "numba"
    usable(backend)
    model = random_600m_model(get_backend(backend, threads=2, activations=activations))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 32, 32), dtype=np.float32)
    t = np.array([500, 500, 500, 500, 500, 500])
    y = np.array([207, 360, 1, 1000, 1000, 1000])  # three classes, then their null-label partners
    batch = model(np.concatenate([x, x]), t, y)
    alone = model(np.concatenate([x[1:2], x[1:2]]), t[:2], np.array([360, 1000]))
    assert np.isfinite(batch).all() and batch.std() > 0
    assert np.array_equal(batch[1], alone[0]) and np.array_equal(batch[4], alone[1])


@pytest.mark.parametrize("activations", ACTIVATION_MODES)
def test_the_same_image_on_every_simd_path_of_this_cpu(small_latent_model, activations):
    """The x86 SIMD tables promise the same bits (integer sums exact; the AVX-512 fp32 tables and
    attention keep the AVX2 arithmetic per lane), so an image does not change between an AVX2 and
    an AVX-512 machine: a guided model call on every x86 SIMD path of this CPU, bit for bit. (NEON
    and the portable path sum fp32 in other orders; docs/reproducibility.md.)"""
    usable("cython")
    from terdit_edge.kernels.cython_backend import _ternary
    paths = [i for i in _ternary.supported_isas() if i in ("avx2", "avx512")]
    if len(paths) < 2:
        pytest.skip(f"needs two x86 SIMD paths (avx2 and avx512); this CPU and build have {_ternary.supported_isas()}")
    model = terdit_edge.load_model(small_latent_model, backend="cython", activations=activations, threads=2)
    rng = np.random.default_rng(3)
    c = model.config
    x = rng.standard_normal((2, c.in_channels, c.input_size, c.input_size), dtype=np.float32)
    t = np.array([500, 500])
    y = np.array([3, c.num_classes])
    outs = {}
    try:
        for isa in paths:
            _ternary.set_isa(isa)
            outs[isa] = model(x, t, y)
    finally:
        _ternary.set_isa("best")
    assert np.isfinite(outs["avx2"]).all() and outs["avx2"].std() > 0
    assert np.array_equal(outs["avx512"], outs["avx2"])
