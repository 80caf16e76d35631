"""Train the small digits feature network shipped for the "digits FID", and its reference statistics.

    pip install ".[examples,fid]"
    python examples/train_digits_features.py            # writes terdit_edge/data/digits_features.onnx
                                                        #    and terdit_edge/data/digits_reference_stats.npz
    python examples/train_digits_features.py --real-npz real_digits.npz   # the real digits, ADM format

Data: scikit-learn's 1,797 UCI digits (8x8, values 0..16), upscaled to 16x16 bilinearly (half-pixel
centres, as the bundled digits model was trained), stored the way sampling jobs store images
(``to_uint8``: x * 255 + 0.5, gray repeated to R = G = B), plus copies shifted by one pixel in each
direction. Network: an MLP 256 -> 128 (ReLU) -> 64 -> ReLU -> 10 classes, fit by scikit-learn
(MLPClassifier, Adam, seed 0). The features are the 64 pre-activations of the second hidden layer
(linear, so no dead ReLU dimensions and a full-rank covariance).

The ONNX graph takes uint8 (N, 16, 16, 3) and returns float32 (N, 64): Cast, Reshape to (N, 768),
MatMul with the first layer's weights divided by 3 * 255 for each of the three channels (the mean of
R, G, B scaled to [0, 1] is folded into the weights), Add, Relu, MatMul, Add. The reference statistics
are the mean and covariance of the features of all 1,797 real digits, computed through onnxruntime
(the same path as `terdit-edge fid`). The script prints the held-out accuracy of the classifier and the
digits FID of one half of the real digits against the other (the metric's noise floor).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from terdit_edge.judge import bilinear_upscale  # the one definition (the judge reads the digits the same way)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


def real_digits_uint8():
    """The real digits as the ADM format stores images: uint8 (1797, 16, 16, 3), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    up = np.clip(bilinear_upscale(d.images.astype(np.float32) / 16.0, SIZE), 0, 1)
    u8 = (up * 255 + 0.5).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=-1), d.target.astype(np.int64)


def shifted(images: np.ndarray) -> np.ndarray:
    """The images and their one-pixel shifts (zero fill) in the 4 directions."""
    out = [images]
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        s = np.zeros_like(images)
        ys = slice(max(dy, 0), SIZE + min(dy, 0))
        yd = slice(max(-dy, 0), SIZE + min(-dy, 0))
        xs = slice(max(dx, 0), SIZE + min(dx, 0))
        xd = slice(max(-dx, 0), SIZE + min(-dx, 0))
        s[:, ys, xs] = images[:, yd, xd]
        out.append(s)
    return np.concatenate(out)


def build_onnx(w1, b1, w2, b2):
    """The feature graph: uint8 (N, 16, 16, 3) -> float32 (N, 64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d_in = SIZE * SIZE
    # x_gray01[p] = mean_c(x[p, c]) / 255  =>  fold into the first layer: w1_rgb[(p, c)] = w1[p] / (3 * 255)
    w1_rgb = np.repeat(w1, 3, axis=0).astype(np.float32) / np.float32(3 * 255)
    assert w1_rgb.shape == (3 * d_in, w1.shape[1])
    inits = [numpy_helper.from_array(np.array([-1, 3 * d_in], dtype=np.int64), "flat_shape"),
             numpy_helper.from_array(w1_rgb, "w1"), numpy_helper.from_array(b1.astype(np.float32), "b1"),
             numpy_helper.from_array(w2.astype(np.float32), "w2"), numpy_helper.from_array(b2.astype(np.float32), "b2")]
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["h1m"]), helper.make_node("Add", ["h1m", "b1"], ["h1a"]),
             helper.make_node("Relu", ["h1a"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["h2m"]), helper.make_node("Add", ["h2m", "b2"], ["features"])]
    graph = helper.make_graph(nodes, "terdit_edge_digits_features",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", w2.shape[1]])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="terdit-edge")
    model.doc_string = ("digits feature network of terdit-edge (examples/train_digits_features.py): an MLP on "
                        "scikit-learn digits at 16x16; features for a 'digits FID', not an Inception network")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "terdit_edge", "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-npz", default=None, metavar="NPZ",
                    help="only write the 1,797 real digits as an ADM-format .npz (arr_0 uint8 (N, 16, 16, 3), labels)")
    args = ap.parse_args()
    if args.real_npz:
        images, labels = real_digits_uint8()
        np.savez(args.real_npz, arr_0=images, labels=labels)
        print(f"wrote {args.real_npz}: arr_0 {images.dtype} {images.shape}")
        return

    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    images, labels = real_digits_uint8()
    tr_i, te_i = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=args.seed, stratify=labels)

    def gray01(u8):
        return u8[..., 0].reshape(len(u8), -1).astype(np.float32) / 255.0

    x_tr = gray01(shifted(images[tr_i]))
    y_tr = np.tile(labels[tr_i], 5)
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), activation="relu", alpha=1e-3, max_iter=300,
                        random_state=args.seed, early_stopping=False)
    clf.fit(x_tr, y_tr)
    acc = float((clf.predict(gray01(images[te_i])) == labels[te_i]).mean())
    print(f"held-out accuracy of the digits classifier: {acc:.4f} ({len(te_i)} real digits)")

    onnx_bytes = build_onnx(clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1])
    os.makedirs(args.out_dir, exist_ok=True)
    net_path = os.path.join(args.out_dir, "digits_features.onnx")
    with open(net_path, "wb") as f:
        f.write(onnx_bytes)

    from terdit_edge.fid import OnnxFeatures, frechet_distance, save_stats, statistics

    net = OnnxFeatures(net_path)
    feats = net.features(images)
    # the ONNX graph equals the classifier's second hidden layer (pre-activation)
    h1 = np.maximum(gray01(images) @ clf.coefs_[0] + clf.intercepts_[0], 0)
    np.testing.assert_allclose(feats, h1 @ clf.coefs_[1] + clf.intercepts_[1], rtol=1e-3, atol=1e-3)
    mu, sigma = statistics(feats)
    save_stats(os.path.join(args.out_dir, "digits_reference_stats.npz"), mu, sigma, len(feats), net.sha256)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(feats))
    a, b = feats[perm[: len(perm) // 2]], feats[perm[len(perm) // 2:]]
    floor = frechet_distance(*statistics(a), *statistics(b))
    print(f"digits FID, real half vs real half ({len(a)} vs {len(b)}): {floor:.3f}")
    print(f"wrote {net_path} ({len(onnx_bytes)} bytes, sha256 {net.sha256[:16]}...) and digits_reference_stats.npz")


if __name__ == "__main__":
    main()
