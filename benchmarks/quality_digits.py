"""Quality of the bundled digits model: is each sample recognised as the class asked for?

    python benchmarks/quality_digits.py [--model PATH] [--per-class 50] [--json]
                                        [--runs ddpm:250,ddim:50,dpm++2m:20,...] [--backend auto]

A run is `sampler:steps`, optionally with a guidance interval `sampler:steps@LO-HI` (guidance only
at timesteps LO <= t <= HI; e.g. `dpm++2m:20@100-500`).

A classifier (RBF SVM, scikit-learn) is fit on the real UCI digits that scikit-learn ships, after
the same 8x8 -> 16x16 bilinear upscale the generator was trained on and the 16x16 -> 8x8 area
downscale applied to the samples; its held-out accuracy is reported. For each sampler and step count
the script generates `per-class` samples of every class (terdit-edge only, no torch), and reports
the fraction classified as the requested class and the within-class diversity: the mean pairwise
distance between samples of a class divided by the same for the real digits of that class
(mean over classes, and the minimum). Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

DEFAULT_RUNS = "ddpm:250,ddpm:50,ddim:50,ddim:ddim25,ddim:20,dpm++2m:50,dpm++2m:20,dpm++2m:10"


def bilinear_upscale(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) -> (N, size, size), bilinear with half-pixel centres and edge clamping
    (torch's F.interpolate(mode="bilinear", align_corners=False))."""
    n, h, w = images.shape

    def axis(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    r0, r1, rf = axis(h, size)
    c0, c1, cf = axis(w, size)
    rows = images[:, r0, :] * (1 - rf)[None, :, None] + images[:, r1, :] * rf[None, :, None]
    return rows[:, :, c0] * (1 - cf) + rows[:, :, c1] * cf


def to_features(images: np.ndarray) -> np.ndarray:
    """(N, S, S) in [-1, 1] -> (N, 64) in the sklearn digits range 0..16 (area downscale to 8x8)."""
    n, s, _ = images.shape
    f = s // 8
    small = np.clip(images, -1, 1).reshape(n, 8, f, 8, f).mean(axis=(2, 4))
    return ((small + 1) * 8).reshape(n, 64)


def mean_pairwise_distance(feats: np.ndarray) -> float:
    d = np.sqrt(np.maximum(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1), 0))
    n = len(feats)
    return float(d.sum() / (n * (n - 1)))


def real_digits(size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    up = np.clip(bilinear_upscale(d.images.astype(np.float32) / 16.0, size), 0, 1) * 2 - 1
    return up, d.target


def fit_classifier(feats, labels, seed=0):
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    f_tr, f_te, y_tr, y_te = train_test_split(feats, labels, test_size=0.25, random_state=seed, stratify=labels)
    clf = SVC(gamma=0.001, C=10.0).fit(f_tr, y_tr)
    return clf, float((clf.predict(f_te) == y_te).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: the bundled digits model)")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of sampler:steps")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import terdit_edge
    from terdit_edge.pipeline import default_model_path

    path = a.model or default_model_path()
    model = terdit_edge.load_model(path, backend=a.backend)
    cfg = model.config
    images, labels = real_digits(cfg.input_size)
    real_feats = to_features(images)
    clf, clf_acc = fit_classifier(real_feats, labels, a.seed)
    classes = np.repeat(np.arange(cfg.num_classes), a.per_class)
    rows = []
    for spec in a.runs.split(","):
        spec, _, interval = spec.partition("@")
        interval = tuple(int(v) for v in interval.split("-")) if interval else None
        sampler, steps = spec.split(":")
        steps = steps if steps.startswith("ddim") else int(steps)
        t0 = time.perf_counter()
        x = terdit_edge.sample(model, classes, steps=steps, sampler=sampler, cfg_scale=a.cfg, seed=a.seed,
                               guidance_interval=interval)
        seconds = time.perf_counter() - t0
        feats = to_features(x[:, 0])
        pred = clf.predict(feats)
        ratios = [mean_pairwise_distance(feats[classes == k]) / mean_pairwise_distance(real_feats[labels == k])
                  for k in range(cfg.num_classes)]
        rows.append({"sampler": sampler, "steps": steps, "cfg": a.cfg, "n": len(classes),
                     "guidance_interval": "{}-{}".format(*interval) if interval else "all",
                     "accuracy": float((pred == classes).mean()),
                     "per_class_accuracy": [float((pred[classes == k] == k).mean()) for k in range(cfg.num_classes)],
                     "diversity_ratio": float(np.mean(ratios)), "min_class_diversity_ratio": float(np.min(ratios)),
                     "seconds": seconds})
    result = {"model": path, "classifier_heldout_accuracy": clf_acc, "backend": model.backend.describe(),
              "runs": rows}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model {path}; classifier held-out accuracy {clf_acc:.3f}; {len(classes)} samples per run, "
          f"cfg {a.cfg}, seed {a.seed}, {model.backend.describe()}")
    print(f"{'sampler':10s} {'steps':>7s} {'guided t':>9s} {'accuracy':>9s} {'diversity':>9s} {'min':>6s} "
          f"{'seconds':>8s}")
    for r in rows:
        print(f"{r['sampler']:10s} {str(r['steps']):>7s} {r['guidance_interval']:>9s} {r['accuracy']:9.1%} "
              f"{r['diversity_ratio']:9.2f} "
              f"{r['min_class_diversity_ratio']:6.2f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
