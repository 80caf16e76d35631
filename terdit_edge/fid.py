"""FID without torch: features from an ONNX network (onnxruntime), activation statistics, the
Fréchet distance (scipy), and k-NN precision/recall.

Feature networks take a batch of images as stored in the ADM format, uint8 (N, H, W, 3), and return
(N, D) features (any trailing 1-sized axes are dropped). A network whose input is float32 gets the
images scaled to [0, 1], in NCHW order when its input's second axis is 3, else NHWC.

* ImageNet FID: the FID Inception network exported once to ONNX on a machine with torch
  (examples/export_inception_onnx.py; docs/scale-out.md), passed with ``--features``.
* Digits FID: ``terdit_edge/data/digits_features.onnx``, a small MLP trained on scikit-learn's
  8x8 digits upscaled to 16x16 (examples/train_digits_features.py), with the statistics of the
  1,797 real digits in ``digits_reference_stats.npz``. A regression metric for the bundled digits
  model, not comparable to any ImageNet FID. ``terdit-edge fid SAMPLES.npz digits`` now runs the
  digits quality judge instead (terdit_edge/judge.py, docs/quality.md); this MLP FID stays available
  through ``compute_fid(..., "digits")`` and ``--features``.

Statistics files are .npz with ``mu`` (D,) and ``sigma`` (D, D) (ADM's reference batches hold such
arrays too) and, when written here, ``features_sha256`` naming the network they came from.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import resources

import numpy as np

from .errors import InputError, TerditError

DIGITS_FEATURES = "digits_features.onnx"
DIGITS_REFERENCE = "digits_reference_stats.npz"


class FIDError(TerditError):
    """FID inputs that cannot be compared (missing extra, mismatched networks, bad files)."""


def bundled_path(name: str) -> str:
    return str(resources.files("terdit_edge").joinpath("data", name))


# ----------------------------------------------------------------------------------------------
# statistics and the distance
# ----------------------------------------------------------------------------------------------

class RunningStats:
    """Mean and covariance (np.cov, rowvar=False, ddof=1) of features added batch by batch, in float64."""

    def __init__(self):
        self.n = 0
        self.total = None
        self.outer = None

    def add(self, feats: np.ndarray):
        f = np.asarray(feats, dtype=np.float64).reshape(len(feats), -1)
        if self.total is None:
            self.total = np.zeros(f.shape[1])
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        self.n += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FIDError(f"need at least 2 images for a covariance, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = RunningStats()
    s.add(feats)
    return s.result()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with scipy's sqrtm; a nearly
    singular product gets eps on the diagonals (as in the ADM evaluator and pytorch-fid)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise FIDError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"the covariance square root has an imaginary part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _kth_neighbour_radii(feats: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    radii = np.empty(len(feats))
    sq = (feats ** 2).sum(1)
    for a in range(0, len(feats), batch):
        d = sq[a:a + batch, None] + sq[None, :] - 2 * feats[a:a + batch] @ feats.T
        radii[a:a + batch] = np.sqrt(np.maximum(np.partition(d, k, axis=1)[:, k], 0))  # [:, 0] is the point itself
    return radii


def _coverage(query: np.ndarray, ref: np.ndarray, radii: np.ndarray, batch: int = 1024) -> float:
    inside = 0
    rq, sr = (query ** 2).sum(1), (ref ** 2).sum(1)
    for a in range(0, len(query), batch):
        d = np.sqrt(np.maximum(rq[a:a + batch, None] + sr[None, :] - 2 * query[a:a + batch] @ ref.T, 0))
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(query)


def precision_recall(sample_feats, ref_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of samples inside the
    k-NN balls of the reference features, and of reference features inside the samples' balls."""
    s = np.asarray(sample_feats, np.float64)
    r = np.asarray(ref_feats, np.float64)
    return _coverage(s, r, _kth_neighbour_radii(r, k)), _coverage(r, s, _kth_neighbour_radii(s, k))


# ----------------------------------------------------------------------------------------------
# the feature network
# ----------------------------------------------------------------------------------------------

def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise FIDError("FID needs onnxruntime and scipy: pip install 'terdit-edge[fid]'") from None
    return onnxruntime


class OnnxFeatures:
    """An ONNX feature network run by onnxruntime on the CPU: ``features(uint8 (N, H, W, 3))``."""

    def __init__(self, path, threads: int | None = None):
        ort = _ort()
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FIDError(f"feature network {self.path!r} does not exist (see docs/scale-out.md to export one)")
        with open(self.path, "rb") as f:
            data = f.read()
        self.sha256 = hashlib.sha256(data).hexdigest()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise FIDError(f"{self.path}: onnxruntime cannot load it: {e}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        if inp.type == "tensor(uint8)":
            self.kind = "uint8"
        elif inp.type == "tensor(float)":
            self.kind = "float"
        else:
            raise FIDError(f"{self.path}: input {inp.name!r} is {inp.type}; expected uint8 or float images")
        if len(self.input_shape) != 4:
            raise FIDError(f"{self.path}: input {inp.name!r} has shape {self.input_shape}; expected 4-D images")
        self.nchw = self.input_shape[1] == 3 and self.input_shape[3] != 3
        if self.kind == "uint8" and self.nchw:
            raise FIDError(f"{self.path}: a uint8 input must be NHWC (N, H, W, 3), got {self.input_shape}")

    def expected_hw(self):
        hw = self.input_shape[2:4] if self.nchw else self.input_shape[1:3]
        return tuple(d if isinstance(d, int) else None for d in hw)

    def features(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise FIDError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        want = self.expected_hw()
        if any(w is not None and w != g for w, g in zip(want, images.shape[1:3])):
            raise FIDError(f"{self.path} takes {want[0]}x{want[1]} images, got {images.shape[1]}x{images.shape[2]}")
        x = np.ascontiguousarray(images)
        if self.kind == "float":
            x = x.astype(np.float32) / 255.0
            if self.nchw:
                x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        out = self.session.run(None, {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float64).reshape(len(images), -1)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def load_stats(path) -> dict | None:
    """mu/sigma (+ features_sha256 when present) of an .npz, or None if it holds no statistics."""
    from .scale.npzio import npz_keys

    keys = npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        return None
    with np.load(path, allow_pickle=False) as z:
        out = {"mu": np.asarray(z["mu"], np.float64), "sigma": np.asarray(z["sigma"], np.float64)}
        if "features_sha256" in z.files:
            out["features_sha256"] = str(z["features_sha256"])
        if "n" in z.files:
            out["n"] = int(z["n"])
    return out


def image_statistics(path, net: OnnxFeatures, batch_size: int = 250, keep: int = 0, progress: bool = True,
                     desc: str = "features"):
    """Stream arr_0 of an .npz through ``net``: (mu, sigma, n, the first ``keep`` features)."""
    from .scale.npzio import NpzArrayReader

    stats = RunningStats()
    kept = []
    with NpzArrayReader(path, "arr_0") as r:
        if r.dtype != np.uint8 or len(r.shape) != 4 or r.shape[3] != 3:
            raise FIDError(f"{path}: arr_0 is {r.dtype} {r.shape}; expected uint8 (N, H, W, 3) (the ADM format)")
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(r), unit="img", desc=desc, dynamic_ncols=True)
        try:
            for batch in r.batches(batch_size):
                f = net.features(batch)
                stats.add(f)
                if sum(len(k) for k in kept) < keep:
                    kept.append(f[: keep - sum(len(k) for k in kept)])
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
    mu, sigma = stats.result()
    return mu, sigma, stats.n, (np.concatenate(kept) if kept else None)


def save_stats(path, mu, sigma, n: int, features_sha256: str):
    np.savez(path, mu=mu, sigma=sigma, n=np.int64(n), features_sha256=np.str_(features_sha256))


def compute_fid(samples, reference, features=None, batch_size: int = 250, threads: int | None = None,
                pr: bool = False, pr_samples: int = 10000, progress: bool = True, save=None) -> dict:
    """FID of ``samples`` against ``reference`` (each an images .npz or a stats .npz; reference may
    be "digits"). ``features``: ONNX file, default the bundled digits network."""
    digits = features is None
    net = OnnxFeatures(bundled_path(DIGITS_FEATURES) if digits else features, threads=threads)
    if digits and reference != "digits" and os.path.exists(str(reference)) is False:
        raise FIDError(f"reference {reference!r} does not exist")
    if reference == "digits":
        if not digits:
            raise FIDError("the bundled 'digits' reference statistics belong to the bundled digits feature network; "
                           "drop --features or pass a reference made with your network")
        reference = bundled_path(DIGITS_REFERENCE)

    def side(path, desc):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FIDError(f"{path!r} does not exist")
        st = load_stats(path)
        if st is not None:
            if st.get("features_sha256") not in (None, net.sha256):
                raise FIDError(f"{path}: its statistics were made with another feature network "
                               f"({st['features_sha256'][:12]}..., this one is {net.sha256[:12]}...)")
            return st["mu"], st["sigma"], st.get("n"), None, st.get("features_sha256") is None
        if digits and net.expected_hw() != (None, None):
            from .scale.npzio import NpzArrayReader
            with NpzArrayReader(path, "arr_0") as r:
                if tuple(r.shape[1:3]) != net.expected_hw():
                    raise FIDError(f"{path} holds {r.shape[1]}x{r.shape[2]} images; the bundled digits feature network "
                                   f"takes only the digits model's 16x16 images. Pass --features FILE.onnx (e.g. the "
                                   "FID Inception network, docs/scale-out.md)")
        mu, sigma, n, kept = image_statistics(path, net, batch_size, keep=pr_samples if pr else 0,
                                              progress=progress, desc=desc)
        return mu, sigma, n, kept, False

    mu1, s1, n1, f1, _ = side(samples, "samples")
    mu2, s2, n2, f2, foreign = side(reference, "reference")
    if save:
        if n1 is None:
            raise FIDError("--save-stats needs an images .npz for the samples")
        save_stats(save, mu1, s1, n1, net.sha256)
    out = {"fid": frechet_distance(mu1, s1, mu2, s2), "kind": "digits FID" if digits else "FID",
           "features": "bundled digits MLP (64-d)" if digits else os.path.basename(net.path),
           "features_sha256": net.sha256, "feature_dim": int(len(mu1)), "n_samples": n1, "n_reference": n2,
           "reference_stats_unlabelled": foreign}
    if pr:
        if f1 is None or f2 is None:
            raise FIDError("precision/recall need images .npz files on both sides (not statistics)")
        out["precision"], out["recall"] = precision_recall(f1, f2)
    return out


def main_fid(args) -> int:
    res = compute_fid(args.samples, args.reference, features=args.features, batch_size=args.batch_size,
                      threads=args.threads, pr=args.pr, pr_samples=args.pr_samples, progress=not args.no_progress,
                      save=args.save_stats)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    if res["kind"] == "digits FID":
        print(f"digits FID: {res['fid']:.4f}  (bundled digits feature network, {res['feature_dim']}-d; a regression "
              "metric for 16x16 digit images, not an ImageNet FID)")
    else:
        print(f"FID: {res['fid']:.4f}  (features: {res['features']}, {res['feature_dim']}-d)")
    print(f"samples: {res['n_samples'] if res['n_samples'] is not None else 'statistics'}; reference: "
          f"{res['n_reference'] if res['n_reference'] is not None else 'statistics'}")
    if res["reference_stats_unlabelled"]:
        print("note: the reference statistics do not name their feature network; they must come from the same "
              "network as --features (ADM's reference batches hold TF-Inception pool_3 statistics)", file=sys.stderr)
    if "precision" in res:
        print(f"precision: {res['precision']:.4f}  recall: {res['recall']:.4f}  (k=3 nearest neighbours)")
    return 0


__all__ = ["frechet_distance", "statistics", "RunningStats", "OnnxFeatures", "compute_fid", "precision_recall",
           "load_stats", "save_stats", "FIDError", "InputError"]
