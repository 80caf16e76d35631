"""Doing less work per image: the step cache and guidance reuse (docs/performance.md, "Fewer network FLOPs").

**Step cache** (``cache=``): on a *full* step an image's network runs every block and the cache
keeps the blocks' residual ``R = h_after_blocks - h_before_blocks`` (B, T, D) with the step's
timestep; on a *skipped* step only the cheap ends run (patch and condition embedding, the final
layer) and the residual is *forecast* from the last ``order + 1`` full steps: the Lagrange (Newton)
polynomial through (t_i, R_i) evaluated at the new t, which is TaylorSeer's finite-difference Taylor
expansion (arXiv 2503.06923) for nonuniform step spacing; ``order=0`` is plain reuse (FORA, 2407.01425).
Forecasting is linear in the cached values, so forecasting the whole stack's residual equals
forecasting every block's attention and feed-forward outputs and summing them, with 1/(2 L) of the
memory. Policies:

* ``fixed:N`` -- a full step every N steps (after the first ``first`` steps, which are full, as are
  the last ``last``); the same decision for every image.
* ``adaptive:THRESH`` -- TeaCache / EasyCache: the relative L1 change of the first block's modulated
  input (a cheap signal: one conditioning layer and a norm) is accumulated over consecutive steps;
  a step is skipped while the sum stays under THRESH, and at most ``max`` steps in a row. Decided
  **per image and per guidance branch** (rows run their blocks in a sub-batch), so an image's bytes
  do not depend on its batch partners.

Spec strings (one form for the library, CLI, JSON, PNG metadata and job identity)::

    fixed:N[,order=M][,first=F][,last=L]
    adaptive:THRESH[,order=M][,first=F][,last=L][,max=K]

**Guidance reuse** (``guidance_reuse=``): classifier-free guidance needs a second, unconditional
network evaluation per guided step. ``fixed:N`` computes it on every N-th guided step (and the first
``first`` and last ``last`` guided steps); on the others the unconditional output is rebuilt from
the conditional one plus the forecast of their difference (FasterCache, 2410.19355), with the same
polynomial forecast (``order``; 0: the last difference as is). Guided steps are those inside the
guidance interval, so the two compose.

Memory per image (float32): the step cache holds ``order + 1`` residuals of T x D per guidance
branch (x 2 with guidance), plus one more T x D per branch for the adaptive signal; guidance reuse
holds ``order + 1`` arrays of the guided channels (C x H x W). For TerDiT-4.2B at 512 px
(T 1024, D 3072) one residual is 12.6 MB: order 1 with guidance is 50 MB per image.

Both are deterministic: forecasts are float32 elementwise sums of float32 products with
coefficients computed in float64 from the timesteps; the adaptive signal is summed in float64.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_ORDER = 4
MAX_INTERVAL = 100


@dataclass(frozen=True)
class CacheSpec:
    """A parsed step-cache (``kind`` "fixed" / "adaptive") or guidance-reuse (kind "fixed") spec."""

    kind: str
    interval: int = 2           # fixed: a full step every `interval` steps
    threshold: float = 0.0      # adaptive: accumulated relative change allowed before a full step
    order: int = 1              # forecast order (0: reuse)
    first: int = 2              # the first steps: always full
    last: int = 1               # the last steps: always full
    max_skip: int = 4           # adaptive: at most this many skipped steps in a row

    def text(self) -> str:
        """The canonical spec string (every parameter written)."""
        if self.kind == "fixed":
            s = f"fixed:{self.interval}"
        else:
            s = f"adaptive:{self.threshold:g}"
        s += f",order={self.order},first={self.first},last={self.last}"
        if self.kind == "adaptive":
            s += f",max={self.max_skip}"
        return s

    def fixed_full(self, i: int, n: int) -> bool:
        """Whether step i of n (0 = the first one run) is computed in full under the fixed policy."""
        if i < self.first or i >= n - self.last:
            return True
        return (i - self.first) % self.interval == 0

    def memory_arrays(self) -> int:
        """float32 arrays of one row's size kept per guidance branch and image."""
        return self.order + 1 + (1 if self.kind == "adaptive" else 0)


def parse_spec(v, what: str = "cache", kinds=("fixed", "adaptive")) -> CacheSpec | None:
    """A spec string (or CacheSpec, or None / "off") -> CacheSpec or None; InputError names ``what``."""
    if v is None:
        return None
    if isinstance(v, CacheSpec):
        if v.kind not in kinds:
            raise InputError(f"{what}: kind must be one of {', '.join(kinds)}, got {v.kind!r}")
        return parse_spec(v.text(), what, kinds)
    if not isinstance(v, str) or len(v) > 200:
        raise InputError(f"{what} must be a spec string such as 'fixed:3' (see docs/performance.md), got {v!r}"[:300])
    text = v.strip().lower()
    if text in ("off", "none", ""):
        return None
    usage = (f"{what} must look like " + " or ".join(
        {"fixed": "'fixed:N[,order=M][,first=F][,last=L]'",
         "adaptive": "'adaptive:THRESH[,order=M][,first=F][,last=L][,max=K]'"}[k] for k in kinds) + f", got {v!r}")
    parts = [p.strip() for p in text.split(",")]
    m = re.fullmatch(r"([a-z]+):([0-9.e+-]+)", parts[0])
    if not m or m.group(1) not in kinds:
        raise InputError(usage[:400])
    kind = m.group(1)
    kw: dict = {}
    try:
        if kind == "fixed":
            kw["interval"] = int(m.group(2))
        else:
            kw["threshold"] = float(m.group(2))
    except ValueError:
        raise InputError(usage[:400]) from None
    names = {"order": "order", "first": "first", "last": "last", "max": "max_skip"}
    for p in parts[1:]:
        if p == "reuse":
            kw["order"] = 0
            continue
        key, eq, val = p.partition("=")
        if not eq or key not in names or (key == "max" and kind != "adaptive") or not val.isdigit():
            raise InputError(usage[:400])
        kw[names[key]] = int(val)
    spec = CacheSpec(kind, **kw)
    if kind == "fixed" and not 1 <= spec.interval <= MAX_INTERVAL:
        raise InputError(f"{what}: the interval N must be in 1..{MAX_INTERVAL}, got {spec.interval}")
    if kind == "adaptive" and not (np.isfinite(spec.threshold) and 0 <= spec.threshold <= 10):
        raise InputError(f"{what}: the threshold must be in 0..10, got {spec.threshold}")
    if not 0 <= spec.order <= MAX_ORDER:
        raise InputError(f"{what}: order must be in 0..{MAX_ORDER}, got {spec.order}")
    if not 0 <= spec.first <= 1000 or not 0 <= spec.last <= 1000 or not 1 <= spec.max_skip <= 1000:
        raise InputError(f"{what}: first and last must be in 0..1000 and max in 1..1000")
    return spec


def check_spec_text(what: str, kinds=("fixed", "adaptive")):
    """A settings check: value -> canonical spec string or None."""
    def check(v):
        spec = parse_spec(v, what, kinds)
        return None if spec is None else spec.text()
    return check


def lagrange_weights(ts, t) -> np.ndarray:
    """float64 weights w_i with p(t) = sum_i w_i f(ts[i]) for the polynomial through the points ts."""
    ts = np.asarray(ts, dtype=np.float64)
    w = np.ones(len(ts), dtype=np.float64)
    for i in range(len(ts)):
        for j in range(len(ts)):
            if j != i:
                w[i] *= (t - ts[j]) / (ts[i] - ts[j])
    return w


def forecast(history, t) -> np.ndarray:
    """The polynomial forecast at t from history [(t_i, array_i)], newest first (float32 arithmetic)."""
    w = lagrange_weights([p[0] for p in history], float(t))
    out = np.float32(w[0]) * history[0][1]
    for wi, (_, a) in zip(w[1:], history[1:]):
        out = out + np.float32(wi) * a
    return out.astype(np.float32, copy=False)


class _Row:
    """One image's state for one guidance branch."""

    __slots__ = ("history", "prev_signal", "acc", "skipped")

    def __init__(self):
        self.history: list = []   # [(t, residual (T, D) float32)], newest first
        self.prev_signal = None   # adaptive: the last step's first-block input
        self.acc = 0.0
        self.skipped = 0


class StepCache:
    """The step cache of one sampling run (one batch): ``forward(model, x, t, labels, keys, i, n)``
    replaces ``model(x, t, labels)``; ``keys[r]`` names row r's (image, branch) state."""

    def __init__(self, spec: CacheSpec, stats: dict):
        self.spec = spec
        self.rows: dict = {}
        self.stats = stats

    def _full(self, row: _Row, signal, i: int, n: int) -> bool:
        sp = self.spec
        if sp.kind == "fixed":
            return sp.fixed_full(i, n) or not row.history
        # adaptive: TeaCache's accumulated relative L1 change of the first block's input
        full = i < sp.first or i >= n - sp.last or not row.history or row.prev_signal is None
        if not full:
            prev = row.prev_signal
            num = float(np.sum(np.abs(signal.astype(np.float64) - prev.astype(np.float64))))
            den = float(np.sum(np.abs(prev.astype(np.float64))))
            row.acc += num / den if den > 0 else float("inf")
            full = row.acc >= sp.threshold or row.skipped >= sp.max_skip
        row.prev_signal = signal
        return full

    def forward(self, model, x: np.ndarray, t: int, labels: np.ndarray, keys, i: int, n: int) -> np.ndarray:
        b = x.shape[0]
        x, tt, y = model._check_inputs(x, np.full(b, t, dtype=np.int64), labels)
        be = model.backend
        h0, c_act = model.embed(x, tt, y)
        signal = model.first_block_input(h0, c_act) if self.spec.kind == "adaptive" else None
        rows = [self.rows.setdefault(k, _Row()) for k in keys]
        full = [self._full(rows[r], None if signal is None else signal[r], i, n) for r in range(b)]
        h0_host = be.to_host(h0)
        h_all = np.empty(h0_host.shape, dtype=np.float32)
        idx = [r for r in range(b) if full[r]]
        if idx:
            h_full = be.asarray(np.ascontiguousarray(h0_host[idx]))
            c_host = be.to_host(c_act)
            h_full = be.to_host(model.run_blocks(h_full, be.asarray(np.ascontiguousarray(c_host[idx]))))
            for j, r in enumerate(idx):
                h_all[r] = h_full[j]
                row = rows[r]
                row.history.insert(0, (float(t), (h_full[j] - h0_host[r]).astype(np.float32)))
                del row.history[self.spec.order + 1:]
                row.acc, row.skipped = 0.0, 0
        for r in range(b):
            if not full[r]:
                row = rows[r]
                h_all[r] = h0_host[r] + forecast(row.history, t)
                row.skipped += 1
        self.stats["network_evals"] = self.stats.get("network_evals", 0) + len(idx)
        self.stats["forecast_evals"] = self.stats.get("forecast_evals", 0) + b - len(idx)
        return model.head(be.asarray(h_all), c_act)


class GuidanceReuse:
    """Guidance reuse of one sampling run: which guided steps compute the unconditional branch, and
    the forecast of (uncond - cond) on the guided channels for the others (same for every image)."""

    def __init__(self, spec: CacheSpec, n_guided: int):
        self.spec = spec
        self.n = n_guided
        self.history: list = []  # [(t, (B, g, H, W) float32)], newest first

    def computes(self, gi: int) -> bool:
        return self.spec.fixed_full(gi, self.n) or not self.history

    def record(self, t: int, diff: np.ndarray) -> None:
        self.history.insert(0, (float(t), diff.astype(np.float32)))
        del self.history[self.spec.order + 1:]

    def uncond(self, t: int, cond_g: np.ndarray) -> np.ndarray:
        return (cond_g + forecast(self.history, t)).astype(np.float32, copy=False)
