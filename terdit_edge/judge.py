"""The digits quality judge: FID, KID, precision/recall, class accuracy and fidelity to an exact run,
each with its uncertainty, for 16x16 digit images (the bundled digits model and the deeper judge model).

Features come from ``data/digits_judge.onnx``, a small CNN trained to see the class *and* damage
(noise, blotches, blur, ghosting, fog) of a digit (examples/train_digits_judge.py, docs/quality.md);
class accuracy from a separate CNN classifier, ``data/digits_classifier.onnx``. The reference is the
1,797 real UCI digits (``data/digits_real.npz``, 8x8 originals upscaled here to 16 px as the models'
training images were).

Uncertainties are standard errors over the samples, the reference held fixed:

* FID: bootstrap over the samples (``bootstrap`` resamples);
* KID: the unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018) over all samples
  against all reference images, its standard error by a delete-one-group jackknife over 20 groups;
* precision / recall (k = 3 nearest neighbours, Kynkaanniemi et al. 2019), class accuracy: binomial
  standard errors sqrt(p (1 - p) / n) (for recall, n = reference images; approximate);
* PSNR / SSIM against an exact run (same seeds, same order): mean over images, standard error of the mean.

``difference(a, b, metric)`` gives a - b with the combined standard error, so two settings can be
called different (|z| > 3) or equal within the noise.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from .fid import FIDError, OnnxFeatures, bundled_path, frechet_distance, precision_recall, statistics

JUDGE_FEATURES = "digits_judge.onnx"
CLASSIFIER = "digits_classifier.onnx"
REAL_DIGITS = "digits_real.npz"
SIZE = 16
PSNR_CAP = 100.0  # dB, for identical images

# every metric and whether lower is better
METRICS = {"fid": True, "kid": True, "precision": False, "recall": False, "accuracy": False,
           "psnr": False, "ssim": False}


def bilinear_upscale(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) -> (N, size, size) bilinear, half-pixel centres, edges clamped (torch's F.interpolate)."""
    n, h, w = images.shape

    def weights(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, src - 1), (pos - lo).astype(np.float32)

    r0, r1, rf = weights(h, size)
    c0, c1, cf = weights(w, size)
    rows = images[:, r0, :] * (1 - rf)[None, :, None] + images[:, r1, :] * rf[None, :, None]
    return rows[:, :, c0] * (1 - cf) + rows[:, :, c1] * cf


def real_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real digits as samples are stored: uint8 (N, 16, 16, 3) (gray repeated), and labels (N,)."""
    with np.load(bundled_path(REAL_DIGITS), allow_pickle=False) as z:
        small, labels = z["images8"].astype(np.float32) / 16.0, z["labels"].astype(np.int64)
    up = np.clip(bilinear_upscale(small, SIZE), 0, 1)
    u8 = (up * 255 + 0.5).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=-1), labels


# ----------------------------------------------------------------------------------------------
# metrics with uncertainties
# ----------------------------------------------------------------------------------------------

def fid_bootstrap(sample_feats, ref_mu, ref_sigma, bootstrap: int = 50, seed: int = 0) -> tuple[float, float]:
    """FID of the samples against (ref_mu, ref_sigma) and its bootstrap standard error over the samples."""
    value = frechet_distance(*statistics(sample_feats), ref_mu, ref_sigma)
    if bootstrap < 2:
        return value, float("nan")
    rng = np.random.default_rng(seed)
    n = len(sample_feats)
    boots = [frechet_distance(*statistics(sample_feats[rng.integers(0, n, n)]), ref_mu, ref_sigma)
             for _ in range(bootstrap)]
    return value, float(np.std(boots, ddof=1))


def kid(sample_feats, ref_feats, groups: int = 20, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over all pairs, and its jackknife standard error
    (samples split into ``groups`` groups at random, each left out once)."""
    x = np.asarray(sample_feats, np.float64)
    y = np.asarray(ref_feats, np.float64)
    n, m, d = len(x), len(y), x.shape[1]
    if n < 2 * groups:
        groups = max(2, n // 2)
    kxx = (x @ x.T / d + 1) ** 3
    np.fill_diagonal(kxx, 0)
    kyy = (y @ y.T / d + 1) ** 3
    ref_term = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    kxy_rows = ((x @ y.T / d + 1) ** 3).sum(1)  # (n,)
    g = np.random.default_rng(seed).permutation(n) % groups
    onehot = np.eye(groups)[g]  # (n, G)
    block = onehot.T @ kxx @ onehot  # (G, G) sums over group pairs (diagonal of kxx zeroed)
    cross = onehot.T @ kxy_rows  # (G,)
    counts = onehot.sum(0)

    def mmd(sxx, scross, k):
        return sxx / (k * (k - 1)) + ref_term - 2 * scross / (k * m)

    value = mmd(block.sum(), cross.sum(), n)
    loo = np.array([mmd(block.sum() - 2 * block[j].sum() + block[j, j], cross.sum() - cross[j], n - counts[j])
                    for j in range(groups)])
    se = np.sqrt((groups - 1) / groups * ((loo - loo.mean()) ** 2).sum())
    return float(value), float(se)


def binomial(p: float, n: int) -> tuple[float, float]:
    return float(p), float(np.sqrt(max(p * (1 - p), 0) / max(n, 1)))


def _gray01(u8: np.ndarray) -> np.ndarray:
    return u8[..., :3].astype(np.float64).mean(-1) / 255.0


def psnr(a_u8: np.ndarray, b_u8: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of gray images in [0, 1] (identical images: PSNR_CAP)."""
    mse = ((_gray01(a_u8) - _gray01(b_u8)) ** 2).mean(axis=(1, 2))
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(1.0 / mse)
    return np.minimum(out, PSNR_CAP)


def ssim(a_u8: np.ndarray, b_u8: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of gray images in [0, 1]: Gaussian window sigma 1.5 px
    (truncated at 2 sigma, for 16 px images), K1 0.01, K2 0.03, mean over the image (reflected edges)."""
    from scipy.ndimage import gaussian_filter

    x, y = _gray01(a_u8), _gray01(b_u8)

    def f(v):
        return gaussian_filter(v, sigma=(0, sigma, sigma), truncate=2.0, mode="reflect")

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(axis=(1, 2))


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    v = np.asarray(v, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


class DigitsJudge:
    """The networks and the reference, loaded once: ``judge.evaluate(images_u8, labels, exact_u8)``."""

    def __init__(self, threads: int | None = None):
        self.features_net = OnnxFeatures(bundled_path(JUDGE_FEATURES), threads=threads)
        self.classifier = OnnxFeatures(bundled_path(CLASSIFIER), threads=threads)
        images, labels = real_digits_uint8()
        self.real_images, self.real_labels = images, labels
        self.set_reference(images)

    def set_reference(self, images_u8: np.ndarray):
        self.ref_feats = self.features(images_u8)
        self.ref_mu, self.ref_sigma = statistics(self.ref_feats)

    def features(self, images_u8: np.ndarray, batch: int = 500) -> np.ndarray:
        self._check(images_u8)
        return np.concatenate([self.features_net.features(images_u8[a:a + batch])
                               for a in range(0, len(images_u8), batch)])

    def predict(self, images_u8: np.ndarray, batch: int = 500) -> np.ndarray:
        self._check(images_u8)
        return np.concatenate([self.classifier.features(images_u8[a:a + batch]).argmax(1)
                               for a in range(0, len(images_u8), batch)])

    @staticmethod
    def _check(images_u8):
        if images_u8.ndim != 4 or images_u8.shape[1:] != (SIZE, SIZE, 3) or images_u8.dtype != np.uint8:
            raise FIDError(f"the digits judge takes uint8 (N, 16, 16, 3) images (the digits models' samples), got "
                           f"{images_u8.dtype} {images_u8.shape}; for other models pass --features FILE.onnx")

    def evaluate(self, images_u8: np.ndarray, labels=None, exact_u8=None, bootstrap: int = 50, seed: int = 0,
                 pr: bool = True) -> dict:
        """Every metric as {"value", "se"} (lower is better for fid and kid); accuracy needs labels,
        psnr/ssim need the exact run's images (same order)."""
        images_u8 = np.asarray(images_u8)
        feats = self.features(images_u8)
        n = len(feats)
        if n < 2:
            raise FIDError(f"need at least 2 images, got {n}")
        out = {"n_samples": n, "n_reference": len(self.ref_feats)}
        v, se = fid_bootstrap(feats, self.ref_mu, self.ref_sigma, bootstrap, seed)
        out["fid"] = {"value": v, "se": se}
        v, se = kid(feats, self.ref_feats, seed=seed)
        out["kid"] = {"value": v, "se": se}
        if pr:
            p, r = precision_recall(feats, self.ref_feats, k=3)
            out["precision"] = dict(zip(("value", "se"), binomial(p, n)))
            out["recall"] = dict(zip(("value", "se"), binomial(r, len(self.ref_feats))))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if len(labels) != n:
                raise FIDError(f"{len(labels)} labels for {n} images")
            acc = float((self.predict(images_u8) == labels).mean())
            out["accuracy"] = dict(zip(("value", "se"), binomial(acc, n)))
        if exact_u8 is not None:
            exact_u8 = np.asarray(exact_u8)
            if exact_u8.shape != images_u8.shape:
                raise FIDError(f"the exact run holds {exact_u8.shape} images, the samples {images_u8.shape}")
            for name, fn in (("psnr", psnr), ("ssim", ssim)):
                v, se = _mean_se(fn(images_u8, exact_u8))
                out[name] = {"value": v, "se": se}
        return out


def difference(a: dict, b: dict, metric: str) -> tuple[float, float]:
    """(a - b, combined standard error) of one metric of two independent evaluations."""
    return a[metric]["value"] - b[metric]["value"], float(np.hypot(a[metric]["se"], b[metric]["se"]))


# ----------------------------------------------------------------------------------------------
# files and the command line
# ----------------------------------------------------------------------------------------------

def load_samples(path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(arr_0 uint8 (N, H, W, 3), labels or None, seeds or None) of an ADM-format .npz."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FIDError(f"{path!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "arr_0" not in z.files:
            raise FIDError(f"{path}: no arr_0 images (the digits judge needs images, not statistics)")
        images = z["arr_0"]
        labels = z["labels"] if "labels" in z.files else None
        seeds = z["seeds"] if "seeds" in z.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise FIDError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)")
    return images, labels, seeds


def judge_files(samples, exact=None, threads=None, bootstrap: int = 50, seed: int = 0) -> dict:
    images, labels, seeds = load_samples(samples)
    exact_images = None
    if exact is not None:
        exact_images, exact_labels, exact_seeds = load_samples(exact)
        for what, a, b in (("labels", labels, exact_labels), ("seeds", seeds, exact_seeds)):
            if a is not None and b is not None and (a.shape != b.shape or not np.array_equal(a, b)):
                raise FIDError(f"--exact {exact}: its {what} differ from the samples'; fidelity compares the same "
                               "seeds and labels image by image")
    judge = DigitsJudge(threads=threads)
    res = judge.evaluate(images, labels=labels, exact_u8=exact_images, bootstrap=bootstrap, seed=seed)
    res.update({"kind": "digits FID", "judge": "digits quality judge (CNN, 64-d; docs/quality.md)",
                "features_sha256": judge.features_net.sha256})
    return res


def main_judge(args) -> int:
    """`terdit-edge fid SAMPLES.npz digits`: the judge's FID, and with --json every metric (flat keys
    ``fid``, ``fid_se``, ...; the value of ``fid`` is the point estimate)."""
    res = judge_files(args.samples, exact=getattr(args, "exact", None), threads=args.threads)
    flat = {k: v for k, v in res.items() if not isinstance(v, dict)}
    for name in METRICS:
        if name in res:
            flat[name], flat[name + "_se"] = res[name]["value"], res[name]["se"]
    if args.json:
        print(json.dumps(flat, indent=2))
        return 0
    print(f"digits FID: {res['fid']['value']:.4f} +- {res['fid']['se']:.4f}  (digits quality judge, 64-d; a "
          "metric for 16x16 digit images, not an ImageNet FID; +- one bootstrap standard error)")
    lines = [f"KID x 1000: {1000 * res['kid']['value']:.3f} +- {1000 * res['kid']['se']:.3f}"]
    for name in ("precision", "recall", "accuracy", "psnr", "ssim"):
        if name in res:
            lines.append(f"{name}: {res[name]['value']:.4f} +- {res[name]['se']:.4f}")
    print("; ".join(lines))
    print(f"samples: {res['n_samples']}; reference: {res['n_reference']} real digits")
    if "accuracy" not in res:
        print("note: no labels in the samples file, so no class accuracy", file=sys.stderr)
    return 0


__all__ = ["DigitsJudge", "difference", "fid_bootstrap", "kid", "psnr", "ssim", "real_digits_uint8",
           "judge_files", "main_judge", "METRICS"]
