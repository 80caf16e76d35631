"""The TerDiT checkpoint converter: layouts, ternarization, label maps, config inference, file choice,
dtypes, its summary, and clear ConvertErrors for everything it must refuse."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest
import torch

import terdit_edge
from terdit_edge.converters.terdit import convert, ternarize_absmean, unpack_released_ternary
from terdit_edge.errors import ConvertError
from terdit_edge.format import read_tdit
from terdit_edge.labels import make_label_map
from terdit_edge.packing import unpack_ternary_2bit

# pytest runs with --import-mode=importlib, which does not put tests/ on sys.path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402

QUIET = None  # log=None: the converter prints nothing


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.std(want))


@torch.no_grad()
def torch_forward(model, x, t, y):
    return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


def inputs(batch=2, num_classes=10):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, 8, 8), dtype=np.float32)
    return x, np.array([999, 250][:batch]), np.array([1, num_classes][:batch])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 10-class dim-64 model saved in both layouts: (model, qat dir, released dir)."""
    root = tmp_path_factory.mktemp("conv")
    model = ref.random_model(dim=64, n_heads=4, n_kv_heads=2, seed=11)
    ref.save_checkpoint(model, str(root / "qat"), "qat")
    ref.save_checkpoint(model, str(root / "released"), "released")
    return model, str(root / "qat"), str(root / "released")


# --------------------------------------------------------------------------------------------------
# ternary weights
# --------------------------------------------------------------------------------------------------
def test_unpack_released_layout_by_hand():
    # Q rows r0..r3 (out = 4, in = 2); f = Q + 1; byte = f(r0) << 6 | f(r1) << 4 | f(r2) << 2 | f(r3)
    q = np.array([[1, -1], [0, 1], [-1, 0], [1, 1]], dtype=np.int8)
    packed = np.array([[(2 << 6) | (1 << 4) | (0 << 2) | 2, (0 << 6) | (2 << 4) | (1 << 2) | 2]], dtype=np.uint8)
    assert packed.tolist() == [[146, 38]]
    np.testing.assert_array_equal(unpack_released_ternary(packed), q)
    np.testing.assert_array_equal(ref.pack_released(torch.from_numpy(q)).numpy(), packed)


def test_unpack_released_layout_interleaves_quarters():
    # out = 8: packed row r holds Q rows r, r + 2, r + 4, r + 6
    rng = np.random.default_rng(1)
    q = rng.integers(-1, 2, size=(8, 5)).astype(np.int8)
    f = (q + 1).astype(np.uint8)
    packed = (f[0:2] << 6) | (f[2:4] << 4) | (f[4:6] << 2) | f[6:8]
    np.testing.assert_array_equal(unpack_released_ternary(packed), q)


def test_unpack_released_rejects_code_3():
    with pytest.raises(ConvertError, match="code 3"):
        unpack_released_ternary(np.array([[0b01010111]], dtype=np.uint8))


def test_absmean_ternarization_rounds_half_to_even():
    # gamma = mean|w| = 2^20 exactly, so w / (gamma + 1e-6) is exact in float32: +-0.5 -> 0 (half to
    # even; half away from zero would give +-1), +-1.5 -> +-2 -> clipped to +-1, 2.5 -> 2 -> 1.
    g = float(2 ** 20)
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [2.5, -0.5, 0.5, 0.5]]) * g
    assert float(w.abs().mean()) == g
    q = ternarize_absmean(w)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [[0, 0, 1, -1], [1, 0, 0, 0]])


def test_absmean_gamma_is_one_per_tensor_not_per_row():
    w = torch.tensor([[0.1, 0.1, 0.1, 0.1], [10.0, 10.0, 10.0, 10.0]])
    # gamma = 5.05: the small row rounds to 0 (a per-row gamma would make it all ones)
    np.testing.assert_array_equal(ternarize_absmean(w), [[0, 0, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("layout", ["qat", "released"])
def test_converted_ternary_weights_equal_reference(small, tmp_path, layout):
    model, qat_dir, rel_dir = small
    out = tmp_path / "m.tdit"
    convert(qat_dir if layout == "qat" else rel_dir, str(out), n_heads=4, log=QUIET)
    tf = read_tdit(str(out))
    for name, mod in model.named_modules():
        if isinstance(mod, ref.TernaryLinear):
            q = unpack_ternary_2bit(tf.tensors[f"dit.{name}.qweight"], mod.in_features)
            np.testing.assert_array_equal(q, mod.ternary().detach().numpy().astype(np.int8), err_msg=name)
            assert tf.tensors[f"dit.{name}.alpha"][0] == np.float32(mod.alphas.item())


def test_released_checkpoint_with_code_3_is_refused(small, tmp_path):
    model, _, _ = small
    state = ref.released_state_dict(model)
    state["layers.1.feed_forward.w2.weight"][3, 5] = 0b11000000
    ref.save_checkpoint(model, str(tmp_path / "bad"), "released", state=state)
    with pytest.raises(ConvertError, match=r"layers\.1\.feed_forward\.w2.*code 3"):
        convert(str(tmp_path / "bad"), str(tmp_path / "bad.tdit"), n_heads=4, log=QUIET)
    assert not (tmp_path / "bad.tdit").exists()


# --------------------------------------------------------------------------------------------------
# label maps
# --------------------------------------------------------------------------------------------------
def test_terdit_label_map_values():
    m = make_label_map("terdit", 1000)
    assert [m[k] for k in (2, 207, 1, 10, 100, 0, 999)] == [112, 121, 1, 2, 3, 0, 999]
    assert sorted(m) == list(range(1000))
    assert make_label_map("identity", 10) == list(range(10))


def test_1000_class_model_defaults_to_terdit_map_and_samples_through_it(tmp_path):
    model = ref.random_model(dim=64, n_heads=4, num_classes=1000, seed=12)
    ref.save_checkpoint(model, str(tmp_path / "ck"), "released")
    summary = convert(str(tmp_path / "ck"), str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)
    assert summary["label_map"] == "terdit"
    m = terdit_edge.load_model(str(tmp_path / "m.tdit"), backend="numpy", threads=1)
    assert m.map_labels([2, 207, 1, 10, 100]).tolist() == [112, 121, 1, 2, 3]
    # standard class 207 must be sampled as raw model label 121
    got = terdit_edge.sample(m, [207], steps=2, sampler="ddim", cfg_scale=4.0, seed=3)
    want = ref.sample_latents(model, [121], 2, "ddim", 4.0, seed=3)
    assert rel_err(got, want) <= 1e-3


def test_small_model_defaults_to_identity_map_and_override_works(small, tmp_path):
    _, qat_dir, _ = small
    assert convert(qat_dir, str(tmp_path / "a.tdit"), n_heads=4, log=QUIET)["label_map"] == "identity"
    m = terdit_edge.load_model(str(tmp_path / "a.tdit"), backend="numpy", threads=1)
    assert m.map_labels([0, 2, 9]).tolist() == [0, 2, 9]
    with pytest.raises(ConvertError, match="label-map"):
        convert(qat_dir, str(tmp_path / "b.tdit"), n_heads=4, label_map="alphabetical", log=QUIET)


# --------------------------------------------------------------------------------------------------
# config inference and file choice
# --------------------------------------------------------------------------------------------------
def test_config_inferred_from_small_checkpoint(small, tmp_path):
    _, qat_dir, _ = small
    cfg = convert(qat_dir, str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)["config"]
    assert (cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]) == (64, 2, 4, 2)
    assert (cfg["ffn_dim"], cfg["cond_dim"], cfg["patch_size"], cfg["in_channels"]) == (256, 64, 2, 4)
    assert (cfg["input_size"], cfg["num_classes"], cfg["qk_norm"], cfg["guided_channels"]) == (8, 10, False, 3)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A one-layer dim-1024 model (32 heads) in the released layout, no n_heads in model_args."""
    root = tmp_path_factory.mktemp("wide")
    model = ref.random_model(dim=1024, n_layers=1, n_heads=32, seed=13, qk_norm=True)
    ref.save_checkpoint(model, str(root / "ck"), "released")
    return str(root / "ck")


def test_heads_default_to_32(wide, tmp_path):
    cfg = convert(wide, str(tmp_path / "m.tdit"), log=QUIET)["config"]
    got = (cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["ffn_dim"], cfg["cond_dim"])
    assert got == (1024, 32, 32, 2816, 1024)
    assert cfg["qk_norm"] is True and cfg["input_size"] == 8


def test_n_heads_override(wide, tmp_path):
    cfg = convert(wide, str(tmp_path / "m.tdit"), n_heads=16, log=QUIET)["config"]
    assert (cfg["n_heads"], cfg["n_kv_heads"]) == (16, 16)


def test_heads_that_do_not_fit_are_a_clear_error(tmp_path):
    # dim 96 with the default 32 heads gives head_dim 3, which RoPE cannot rotate in pairs
    model = ref.random_model(dim=96, n_layers=1, n_heads=4, seed=14)
    ref.save_checkpoint(model, str(tmp_path / "ck"), "qat")
    with pytest.raises(ConvertError, match="heads"):
        convert(str(tmp_path / "ck"), str(tmp_path / "m.tdit"), log=QUIET)
    with pytest.raises(ConvertError, match="heads"):
        convert(str(tmp_path / "ck"), str(tmp_path / "m.tdit"), n_heads=5, log=QUIET)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A directory holding three weight files of three different models (same shapes)."""
    root = tmp_path_factory.mktemp("crowded") / "ck"
    a = ref.random_model(dim=64, n_heads=4, seed=21)  # released EMA ternary
    b = ref.random_model(dim=64, n_heads=4, seed=22)  # EMA float
    c = ref.random_model(dim=64, n_heads=4, seed=23)  # raw (non-EMA) float
    ref.save_checkpoint(a, str(root), "released")
    ref.save_checkpoint(b, str(root), "qat")
    torch.save(c.state_dict(), root / "consolidated.00-of-01.pth")
    return str(root), a, b, c


def test_directory_prefers_ema_ternary_file(crowded, tmp_path):
    root, a, b, _ = crowded
    summary = convert(root, str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)
    assert summary["layout"] == "released-packed"
    x, t, y = inputs()
    got = terdit_edge.load_model(str(tmp_path / "m.tdit"), backend="numpy", threads=1)(x, t, y)
    assert rel_err(got, torch_forward(a, x, t, y)) <= 1e-4
    assert rel_err(got, torch_forward(b, x, t, y)) > 1e-2


@pytest.mark.parametrize("which", ["b", "c"])
def test_weights_argument_overrides_the_choice(crowded, tmp_path, which):
    root, _, b, c = crowded
    name, model = ("consolidated_ema.00-of-01.pth", b) if which == "b" else ("consolidated.00-of-01.pth", c)
    summary = convert(root, str(tmp_path / "m.tdit"), n_heads=4, weights=name, log=QUIET)
    assert summary["layout"] == "qat-float"
    x, t, y = inputs()
    got = terdit_edge.load_model(str(tmp_path / "m.tdit"), backend="numpy", threads=1)(x, t, y)
    assert rel_err(got, torch_forward(model, x, t, y)) <= 1e-4


def test_training_checkpoint_uses_its_ema_weights(tmp_path):
    ema = ref.random_model(dim=64, n_heads=4, seed=31)
    raw = ref.random_model(dim=64, n_heads=4, seed=32)
    args = ref.model_args(ema, qk_norm=False)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "args": args}, tmp_path / "0050000.pt")
    convert(str(tmp_path / "0050000.pt"), str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)
    x, t, y = inputs()
    got = terdit_edge.load_model(str(tmp_path / "m.tdit"), backend="numpy", threads=1)(x, t, y)
    assert rel_err(got, torch_forward(ema, x, t, y)) <= 1e-4


# --------------------------------------------------------------------------------------------------
# dtype and summary
# --------------------------------------------------------------------------------------------------
def test_fp16_conversion_is_close_to_fp32(small, tmp_path):
    model, qat_dir, _ = small
    convert(qat_dir, str(tmp_path / "h.tdit"), n_heads=4, dtype="fp16", log=QUIET)
    tf = read_tdit(str(tmp_path / "h.tdit"))
    assert tf.tensors["dit.x_embedder.weight"].dtype == np.float16
    assert tf.tensors["dit.layers.0.attention.wq.qweight"].dtype == np.uint8
    x, t, y = inputs()
    want = torch_forward(model, x, t, y)
    got = terdit_edge.load_model(str(tmp_path / "h.tdit"), backend="numpy", threads=1)(x, t, y)
    err = rel_err(got, want)
    assert 0 < err <= 1e-2
    with pytest.raises(ConvertError, match="dtype"):
        convert(qat_dir, str(tmp_path / "x.tdit"), n_heads=4, dtype="bf8", log=QUIET)


def test_fp16_overflow_is_a_clear_error(tmp_path):
    """A float parameter beyond the fp16 range (65504) cannot be stored as fp16: ConvertError, no file."""
    model = ref.random_model(dim=64, n_heads=4, seed=15)
    with torch.no_grad():
        model.x_embedder.bias[0] = 1e5
    ref.save_checkpoint(model, str(tmp_path / "ck"), "qat")
    with pytest.raises(ConvertError, match="fp16"):
        convert(str(tmp_path / "ck"), str(tmp_path / "m.tdit"), n_heads=4, dtype="fp16", log=QUIET)
    assert not (tmp_path / "m.tdit").exists()


def test_summary_reports_config_counts_zero_fraction_and_sizes(small, tmp_path):
    model, _, rel_dir = small
    lines = []
    summary = convert(rel_dir, str(tmp_path / "m.tdit"), n_heads=4, log=lines.append)
    text = "\n".join(lines)
    total, zeros = ref.ternary_stats(model)
    assert summary["ternary_params"] == total
    assert summary["ternary_zero_fraction"] == pytest.approx(zeros / total)
    assert summary["file_bytes"] == os.path.getsize(tmp_path / "m.tdit")
    assert summary["source_bytes"] == os.path.getsize(os.path.join(rel_dir, ref.RELEASED_FILE))
    assert "config" in text and "dim 64" in text and "2 layers" in text and "4 heads" in text
    assert f"{zeros / total:.1%} zeros" in text
    assert "ternary" in text and "wrote" in text and ("KB" in text or "MB" in text)


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
def test_missing_key_is_refused(small, tmp_path):
    model, _, _ = small
    state = model.state_dict()
    del state["layers.1.ffn_norm.weight"]
    ref.save_checkpoint(model, str(tmp_path / "ck"), "qat", state=state)
    with pytest.raises(ConvertError, match=r"missing.*layers\.1\.ffn_norm\.weight"):
        convert(str(tmp_path / "ck"), str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)


def test_unexpected_key_is_refused(small, tmp_path):
    model, _, _ = small
    state = dict(model.state_dict())
    state["pos_embed"] = torch.zeros(1, 16, 64)
    ref.save_checkpoint(model, str(tmp_path / "ck"), "qat", state=state)
    with pytest.raises(ConvertError, match="unexpected.*pos_embed"):
        convert(str(tmp_path / "ck"), str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)


def test_non_terdit_state_dict_is_refused(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(net.state_dict(), tmp_path / "mlp.pth")
    with pytest.raises(ConvertError, match="not a TerDiT checkpoint"):
        convert(str(tmp_path / "mlp.pth"), str(tmp_path / "m.tdit"), log=QUIET)


class NotAllowed:
    """A class a checkpoint must not be able to make us import and build."""

    def __init__(self):
        self.payload = 1


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_custom_class_is_refused(tmp_path):
    torch.save({"model": NotAllowed()}, tmp_path / "custom.pth")
    with pytest.raises(ConvertError, match="safely"):
        convert(str(tmp_path / "custom.pth"), str(tmp_path / "m.tdit"), log=QUIET)


def test_pickle_with_os_system_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x_embedder.weight": torch.zeros(2, 2), "evil": RunsACommand(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ConvertError, match="safely"):
        convert(str(tmp_path / "evil.pth"), str(tmp_path / "m.tdit"), log=QUIET)
    assert not marker.exists()


def test_model_args_with_unsafe_global_is_refused(small, tmp_path):
    _, qat_dir, _ = small
    ck = tmp_path / "ck"
    ck.mkdir()
    os.link(os.path.join(qat_dir, ref.QAT_FILE), ck / ref.QAT_FILE)
    marker = tmp_path / "pwned"
    torch.save(argparse.Namespace(model=RunsACommand(marker)), ck / "model_args.pth")
    with pytest.raises(ConvertError, match="model_args"):
        convert(str(ck), str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)
    assert not marker.exists()


def test_nonexistent_path_is_refused(tmp_path):
    with pytest.raises(ConvertError, match="does not exist"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "m.tdit"), log=QUIET)


def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no TerDiT weights"):
        convert(str(tmp_path / "empty"), str(tmp_path / "m.tdit"), log=QUIET)


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"", bytes(range(256)) * 8],
                         ids=["text", "empty", "binary"])
def test_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    (tmp_path / "junk.pth").write_bytes(content)
    with pytest.raises(ConvertError):
        convert(str(tmp_path / "junk.pth"), str(tmp_path / "m.tdit"), log=QUIET)


def test_authors_label_embedding_key_is_accepted(small, tmp_path):
    """DiT-line models hold the label table as ``y_embedder.embedding_table = nn.Embedding(...)``, so
    the state-dict key is ``y_embedder.embedding_table.weight``."""
    model, qat_dir, _ = small
    assert "y_embedder.embedding_table.weight" in model.state_dict()
    convert(qat_dir, str(tmp_path / "m.tdit"), n_heads=4, log=QUIET)


def test_a_new_checkpoint_layout_is_one_table_entry(tmp_path, monkeypatch):
    """A (made-up) layout storing Q directly as int8 (out, in): one Layout entry, nothing else."""
    from terdit_edge.converters import terdit as conv

    model = ref.random_model(dim=64, n_heads=4, seed=41)
    ck = tmp_path / "ck"
    ref.save_checkpoint(model, str(ck), "released")
    state = torch.load(ck / "consolidated_ema_ternary.00-of-01.pth", weights_only=True)
    for key, value in list(state.items()):
        if key.endswith(".weight") and value.dtype == torch.uint8:
            state[key] = torch.from_numpy(unpack_released_ternary(value.numpy()))
    int8_file = tmp_path / "codes.pth"
    torch.save(state, int8_file)

    def int8_codes(w, n, k):
        if w.dtype != torch.int8 or tuple(w.shape) != (n, k):
            raise ConvertError(f"is {w.dtype}{tuple(w.shape)}, expected int8 ({n}, {k})")
        return w.numpy()

    monkeypatch.setattr(conv, "LAYOUTS", conv.LAYOUTS + (conv.Layout(
        "int8-codes", ("codes.pth",), detect=lambda wq: wq.dtype == torch.int8, rows_per_stored_row=1,
        to_codes=int8_codes),))
    summary = convert(str(int8_file), str(tmp_path / "codes.tdit"), n_heads=4, label_map="identity", log=QUIET)
    assert summary["layout"] == "int8-codes"
    convert(str(ck), str(tmp_path / "released.tdit"), n_heads=4, label_map="identity", log=QUIET)
    a, b = read_tdit(tmp_path / "codes.tdit"), read_tdit(tmp_path / "released.tdit")
    for name, arr in b.tensors.items():
        assert np.array_equal(a.tensors[name], arr), name


def test_unknown_layout_is_refused_with_the_known_ones(tmp_path):
    model = ref.random_model(dim=64, n_heads=4, seed=42)
    state = {k: v for k, v in model.state_dict().items()}
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"].to(torch.int32)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ConvertError, match="not a known ternary checkpoint layout.*released-packed.*qat-float"):
        convert(str(path), str(tmp_path / "o.tdit"), n_heads=4, log=QUIET)
