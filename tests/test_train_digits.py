"""Smoke tests for examples/train_digits.py: a few steps on a tiny config, then the checkpoint layout."""
import argparse
import importlib.util
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"

TINY = dict(dim=32, n_layers=2, n_heads=2, patch_size=2)


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def td():
    return load_example()


def run_tiny(td, out, seed=0, steps=3):
    args = td.parse_args(["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--batch-size", "8",
                          "--dim", str(TINY["dim"]), "--n-layers", str(TINY["n_layers"]),
                          "--n-heads", str(TINY["n_heads"]), "--patch-size", str(TINY["patch_size"]),
                          "--warmup", "2", "--log-every", "1", "--eval-samples", "0", "--threads", "1"])
    td.train(args)
    return out


@pytest.fixture(scope="module")
def tiny_run(td, tmp_path_factory):
    return run_tiny(td, tmp_path_factory.mktemp("digits"))


def expected_shapes(dim, n_layers, patch_size, in_channels=1, num_classes=10):
    """The TerDiT QAT key layout (docs/model.md §2-3) for the given config."""
    cond = min(dim, 1024)
    ffn = 256 * math.ceil(int(2 * 4 * dim / 3) / 256)
    ppc = patch_size * patch_size * in_channels
    shapes = {
        "x_embedder.weight": (dim, ppc), "x_embedder.bias": (dim,),
        "t_embedder.mlp.0.weight": (cond, 256), "t_embedder.mlp.0.bias": (cond,),
        "t_embedder.mlp.2.weight": (cond, cond), "t_embedder.mlp.2.bias": (cond,),
        "y_embedder.embedding_table.weight": (num_classes + 1, cond),
        "final_layer.linear.weight": (2 * ppc, dim), "final_layer.linear.bias": (2 * ppc,),
        "final_layer.adaLN_modulation.1.weight": (2 * dim, cond),
        "final_layer.adaLN_modulation.1.bias": (2 * dim,),
    }
    ternary = {"attention.wq": (dim, dim), "attention.wk": (dim, dim), "attention.wv": (dim, dim),
               "attention.wo": (dim, dim), "feed_forward.w1": (ffn, dim), "feed_forward.w2": (dim, ffn),
               "feed_forward.w3": (ffn, dim), "adaLN_modulation.1": (6 * dim, cond)}
    for i in range(n_layers):
        for name, shape in ternary.items():
            shapes[f"layers.{i}.{name}.weight"] = shape
            shapes[f"layers.{i}.{name}.alphas"] = (1,)
        shapes[f"layers.{i}.adaLN_modulation.1.bias"] = (6 * dim,)
        shapes[f"layers.{i}.adaLN_modulation.2.weight"] = (6 * dim,)
        shapes[f"layers.{i}.attention_norm.weight"] = (dim,)
        shapes[f"layers.{i}.ffn_norm.weight"] = (dim,)
    return shapes


def test_model_args_load_with_weights_only_and_describe_the_model(tiny_run):
    with torch.serialization.safe_globals([argparse.Namespace]):
        margs = torch.load(tiny_run / "model_args.pth", weights_only=True)
    assert isinstance(margs, argparse.Namespace)
    assert margs.model == "DiT_Llama_digits"
    got = (margs.image_size, margs.num_classes, margs.in_channels, margs.vae, margs.qk_norm)
    assert got == (16, 10, 1, "none", False)
    assert (margs.dim, margs.n_layers, margs.n_heads, margs.patch_size) == (
        TINY["dim"], TINY["n_layers"], TINY["n_heads"], TINY["patch_size"])
    assert (margs.seed, margs.steps) == (0, 3)


@pytest.mark.parametrize("name", ["consolidated_ema.00-of-01.pth", "consolidated.00-of-01.pth"])
def test_checkpoint_keys_and_shapes_follow_the_terdit_layout(tiny_run, name):
    state = torch.load(tiny_run / name, weights_only=True)
    expected = expected_shapes(TINY["dim"], TINY["n_layers"], TINY["patch_size"])
    assert set(state) == set(expected), (sorted(set(state) - set(expected)), sorted(set(expected) - set(state)))
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
        assert state[key].dtype == torch.float32, key
        assert torch.isfinite(state[key]).all(), key


def test_ema_checkpoint_differs_from_raw_weights(tiny_run):
    ema = torch.load(tiny_run / "consolidated_ema.00-of-01.pth", weights_only=True)
    raw = torch.load(tiny_run / "consolidated.00-of-01.pth", weights_only=True)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_same_seed_reproduces_the_weights_and_another_seed_does_not(td, tiny_run, tmp_path):
    first = torch.load(tiny_run / "consolidated.00-of-01.pth", weights_only=True)
    again = torch.load(run_tiny(td, tmp_path / "again") / "consolidated.00-of-01.pth", weights_only=True)
    other = torch.load(run_tiny(td, tmp_path / "other", seed=1) / "consolidated.00-of-01.pth", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_ternary_linear_applies_alphas_times_rounded_weight(td):
    torch.manual_seed(0)
    layer = td.TernaryLinear(7, 5)
    layer.alphas.data.fill_(0.25)
    w = layer.weight.detach()
    q = torch.clamp(torch.round(w / (w.abs().mean() + 1e-6)), -1, 1)
    x = torch.randn(3, 7)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(layer(x), x @ (0.25 * q).T, rtol=0, atol=1e-6)


def test_ternary_linear_passes_gradients_straight_through(td):
    torch.manual_seed(0)
    layer = td.TernaryLinear(4, 3)
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    # d(sum y)/dW = alphas * sum over the batch of x, for every output row
    expected = layer.alphas.detach() * x.sum(0).expand(3, 4)
    torch.testing.assert_close(layer.weight.grad, expected)
    assert layer.alphas.grad is not None and layer.alphas.grad.shape == (1,)


def test_unpatchify_orders_token_vectors_as_row_col_channel(td):
    model = td.DiTLlama(dim=16, n_layers=1, n_heads=2, patch_size=2, input_size=4)
    # one token grid 2x2, out channels 2: value encodes (token, p_row, p_col, channel)
    tokens = torch.zeros(1, 4, 8)
    for tok in range(4):
        for pr in range(2):
            for pc in range(2):
                for ch in range(2):
                    tokens[0, tok, (pr * 2 + pc) * 2 + ch] = 1000 * tok + 100 * pr + 10 * pc + ch
    img = model.unpatchify(tokens)
    gr, gc, pr, pc, ch = 1, 0, 1, 1, 1  # token (1, 0) of the grid is token index 2
    assert img[0, ch, gr * 2 + pr, gc * 2 + pc] == 1000 * 2 + 100 * pr + 10 * pc + ch


def test_patchify_orders_token_vectors_as_channel_row_col(td):
    model = td.DiTLlama(dim=16, n_layers=1, n_heads=2, patch_size=2, in_channels=1, input_size=4)
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens = model.patchify(img)
    assert tokens.shape == (1, 4, 4)
    assert tokens[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # grid position (0, 1), rows then columns


def test_timestep_features_put_cosines_first(td):
    feats = td.TimestepEmbedder.features(torch.tensor([0, 5]))
    assert feats.shape == (2, 256)
    torch.testing.assert_close(feats[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert math.isclose(feats[1, 0].item(), math.cos(5.0), rel_tol=1e-6)
    assert math.isclose(feats[1, 128].item(), math.sin(5.0), rel_tol=1e-6)
