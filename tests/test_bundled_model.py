"""The bundled model terdit_edge/data/digits.tdit, judged on what it draws.

A classifier (RBF SVM) is fit in the test on scikit-learn's UCI digits, brought to the model's
16x16 domain the way the model's training data was (benchmarks/quality_digits.py: bilinear 8x8 ->
16x16 upscale, then the 16x16 -> 8x8 area downscale applied to every image before classifying).
The bundled model then samples a few images of every class with DPM-Solver++(2M), 20 steps, cfg 4,
through the public pipeline, and at least 90% must be classified as the class asked for. The same
judge gives a copy of the model with its weights zeroed a low score, so the threshold has teeth.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import terdit_edge
from terdit_edge.format import read_tdit, write_tdit
from terdit_edge.pipeline import default_model_path

pytest.importorskip("sklearn", reason="the judge is a scikit-learn classifier (test extras)")

PER_CLASS = 5
QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_digits.py"


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_digits", QUALITY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def judge():
    """(classifier, to_features); the classifier's held-out accuracy must be high for the score to mean anything."""
    q = _quality_module()
    images, labels = q.real_digits(16)
    clf, heldout = q.fit_classifier(q.to_features(images), labels, seed=0)
    assert heldout >= 0.97, f"the judge itself is weak: held-out accuracy {heldout:.3f}"
    return clf, q.to_features


def score(path, judge) -> tuple[float, np.ndarray, np.ndarray]:
    clf, to_features = judge
    pipe = terdit_edge.Pipeline.load(path)
    classes = np.repeat(np.arange(10), PER_CLASS)
    images01 = pipe(classes.tolist(), steps=20, sampler="dpm++2m", cfg_scale=4.0, seed=0,
                    progress=False, output="np")
    assert images01.shape == (len(classes), 16, 16, 1)
    pred = clf.predict(to_features(images01[..., 0] * 2 - 1))
    return float((pred == classes).mean()), pred, classes


def test_bundled_model_draws_the_requested_digits(judge):
    acc, pred, classes = score(default_model_path(), judge)
    wrong = [(int(c), int(p)) for c, p in zip(classes, pred) if c != p]
    assert acc >= 0.90, f"bundled model: {acc:.0%} classified as requested; (asked, seen) misses: {wrong}"


def test_the_judge_rejects_a_model_with_zeroed_weights(judge, tmp_path):
    tf = read_tdit(default_model_path())
    tensors = {k: (np.zeros_like(v) if v.dtype.kind == "f" else np.array(v)) for k, v in tf.tensors.items()}
    meta = {k: v for k, v in tf.metadata.items() if k not in ("format", "format_version", "checksums")}
    path = tmp_path / "zeroed.tdit"
    write_tdit(path, tensors, meta)
    acc, _, _ = score(path, judge)
    assert acc <= 0.4, f"a model with zeroed weights scored {acc:.0%}: the judge cannot tell"
