"""Schedules and samplers of the ADM / DiT GaussianDiffusion, model-agnostic.

The sampler sees only ``model(x, t, y) -> (B, 2C, H, W)`` (eps then the learned variance value v),
plus ``model.config`` (in_channels, input_size, guided_channels), ``model.map_labels`` and
``model.null_label``. Schedule arithmetic is float64; coefficients are cast to float32 where they
meet the tensors, as in the authors' code. Logarithms and exponentials are :mod:`terdit_edge.detmath`'s
(IEEE basic operations only), not NumPy's CPU-dispatched loops: a sampler step has the same bits on
every CPU.

Randomness contract (an image is a pure function of the model file, its class, its seed and the
sampler settings, whatever batch, process, thread count or machine made it): every image k has its
own integer seed ``seeds[k]`` (``seed=s`` means ``seeds[k] = s + k``) and its own generator
``rng_k = numpy.random.default_rng(seeds[k])``, which draws the image's initial noise
``rng_k.standard_normal((C, H, W), dtype=float32)`` and then exactly one draw of that shape per
step, every step and every sampler, whether the step uses it or not. See docs/reproducibility.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import detmath
from .errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
# The version of the randomness contract above. Whatever records "these bytes came from these
# settings" (a sampling job's identity) records it too; change it with any change to the draws.
RNG_CONTRACT_VERSION = 1


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT's linear schedule, scaled to 1000 steps: 1e-4 .. 0.02, float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def respaced_timesteps(spec, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The original timesteps kept by the respacing rule, ascending.

    ``spec`` is an int N (or the string "N"): one section, stride (T-1)/(N-1), kept indices
    round(cur) with cur advanced by repeated addition of the stride (Python round, half-to-even),
    exactly as the authors' ``space_timesteps``; or "ddimN": the integer stride range(0, T, s) that
    yields exactly N steps.
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim"):])
        except ValueError:
            raise InputError(f"bad step spec {spec!r}: expected 'ddimN' with N an integer") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise InputError(f"no integer stride gives exactly {desired} steps out of {num_timesteps} "
                         f"for {spec!r}; pick another N or use a plain step count")
    if isinstance(spec, (list, tuple, np.ndarray)):
        return _timestep_list(spec, num_timesteps)
    if isinstance(spec, bool):
        raise InputError(f"steps must be an integer or 'ddimN', got {spec!r}")
    try:
        count = int(spec)
    except (TypeError, ValueError):
        raise InputError(f"steps must be an integer or 'ddimN', got {spec!r}") from None
    if isinstance(spec, float) and spec != count:
        raise InputError(f"steps must be an integer, got {spec!r}")
    if count < 1:
        raise InputError(f"steps must be at least 1, got {count}")
    if count > num_timesteps:
        raise InputError(f"steps must be at most {num_timesteps}, got {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def _timestep_list(spec, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """An explicit list of timesteps (a searched schedule): distinct integers in 0..T-1, returned ascending."""
    vals = list(spec)
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
        raise InputError(f"steps as a timestep list must be a non-empty list of integers, got {spec!r}"[:300])
    vals = sorted(int(v) for v in vals)
    if vals[0] < 0 or vals[-1] > num_timesteps - 1 or len(set(vals)) != len(vals):
        raise InputError(f"timesteps must be distinct integers in 0..{num_timesteps - 1}, got {spec!r}"[:300])
    return vals


_SCHEDULES: dict | None = None


def named_schedules() -> dict:
    """The shipped timestep schedules (terdit_edge/data/schedules.json): name -> entry with
    ``timesteps`` (ascending), ``sampler`` (the solver it was searched for) and how it was found."""
    global _SCHEDULES
    if _SCHEDULES is None:
        import json
        from importlib import resources

        table = json.loads(resources.files("terdit_edge").joinpath("data", "schedules.json").read_text())
        table.pop("_about", None)
        # listed by solver, then step count (the file keeps the order the searches were run in)
        _SCHEDULES = dict(sorted(table.items(), key=lambda kv: (kv[1]["sampler"], len(kv[1]["timesteps"]), kv[0])))
    return _SCHEDULES


def schedule_timesteps(name: str) -> list[int]:
    """The timesteps of a shipped schedule (InputError lists the names)."""
    table = named_schedules()
    if not isinstance(name, str) or name not in table:
        raise InputError(f"unknown schedule {name!r}; choose one of {', '.join(table)}"[:400])
    return list(table[name]["timesteps"])


@dataclass(frozen=True)
class Schedule:
    """Per-step float64 coefficients of a (respaced) diffusion; index j is sampler step j."""

    timesteps: np.ndarray  # original timestep of each step (model input), ascending
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    log_betas: np.ndarray

    @classmethod
    def create(cls, spec=250) -> "Schedule":
        base_abar = np.cumprod(1.0 - linear_betas())
        kept = respaced_timesteps(spec)
        betas, last = [], 1.0
        for t in kept:
            betas.append(1.0 - base_abar[t] / last)
            last = base_abar[t]
        betas = np.array(betas, dtype=np.float64)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        if len(betas) > 1:
            clipped = detmath.log64(np.append(post_var[1], post_var[1:]))
        else:  # one step: the posterior variance is 0; use beta so that the (masked) term stays finite
            clipped = detmath.log64(betas)
        return cls(
            timesteps=np.array(kept, dtype=np.int64), betas=betas, alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            posterior_log_variance_clipped=clipped, log_betas=detmath.log64(betas),
        )

    def __len__(self) -> int:
        return len(self.betas)


def _f32(v) -> np.float32:
    return np.float32(v)


def predict_x0(s: Schedule, j: int, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
    return _f32(s.sqrt_recip_alphas_cumprod[j]) * x - _f32(s.sqrt_recipm1_alphas_cumprod[j]) * eps


def ddpm_step(s: Schedule, j: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """One ancestral step with the learned-range variance (p_sample with clip_denoised=False)."""
    c = x.shape[1]
    eps, v = model_out[:, :c], model_out[:, c:]
    pred_x0 = predict_x0(s, j, x, eps)
    mean = _f32(s.posterior_mean_coef1[j]) * pred_x0 + _f32(s.posterior_mean_coef2[j]) * x
    frac = (v + np.float32(1)) / np.float32(2)
    log_var = frac * _f32(s.log_betas[j]) + (np.float32(1) - frac) * _f32(s.posterior_log_variance_clipped[j])
    if s.timesteps[j] == 0 or j == 0:
        return mean.astype(np.float32, copy=False)
    return (mean + detmath.exp32(np.float32(0.5) * log_var) * noise).astype(np.float32, copy=False)


def ddim_step(s: Schedule, j: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray,
              eta: float = 0.0) -> np.ndarray:
    """One DDIM(eta) step (ddim_sample with clip_denoised=False)."""
    c = x.shape[1]
    eps = model_out[:, :c]
    pred_x0 = predict_x0(s, j, x, eps)
    eps2 = (_f32(s.sqrt_recip_alphas_cumprod[j]) * x - pred_x0) / _f32(s.sqrt_recipm1_alphas_cumprod[j])
    abar, abar_prev = _f32(s.alphas_cumprod[j]), _f32(s.alphas_cumprod_prev[j])
    one = np.float32(1)
    sigma = (np.float32(eta) * np.sqrt((one - abar_prev) / (one - abar)) * np.sqrt(one - abar / abar_prev))
    sigma = np.float32(sigma)
    mean = pred_x0 * np.sqrt(abar_prev) + np.sqrt(one - abar_prev - sigma * sigma) * eps2
    if j == 0:
        return mean.astype(np.float32, copy=False)
    return (mean + sigma * noise).astype(np.float32, copy=False)


class Sampler:
    """One sampler: ``step(j, x, model_out, noise) -> x`` for sampler step j (counting down from
    len(schedule) - 1 to 0), given the guided model output (B, 2C, H, W) at x and that step's noise
    draw (B, C, H, W). The noise is drawn every step whatever the sampler (the RNG contract);
    ``uses_noise`` says whether this one reads it. ``default_steps`` is what callers use when they
    give no step count. A sampler object holds the state of one run (multistep history).

    Add a sampler by subclassing this, setting ``name`` (and ``aliases``) and decorating the class
    with :func:`register_sampler`; ``sample()``, the CLI and the server take their choices and
    defaults from :data:`SAMPLER_REGISTRY`.
    """

    name = ""
    aliases: tuple[str, ...] = ()
    default_steps = 50
    uses_noise = False

    def __init__(self, schedule: Schedule, eta: float = 0.0):
        self.s = schedule
        self.eta = eta

    def step(self, j: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray) -> np.ndarray:
        raise NotImplementedError


SAMPLER_REGISTRY: dict[str, type[Sampler]] = {}
_SAMPLER_ALIASES: dict[str, str] = {}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: make a Sampler subclass selectable by its name and aliases."""
    if not cls.name or cls.name in SAMPLER_REGISTRY:
        raise ValueError(f"sampler name {cls.name!r} is empty or taken")
    SAMPLER_REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _SAMPLER_ALIASES[alias] = cls.name
    return cls


def sampler_class(name) -> type[Sampler]:
    """The registered sampler for a name or alias (case-insensitive); InputError lists the choices."""
    key = str(name).lower()
    key = _SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLER_REGISTRY:
        raise InputError(f"unknown sampler {name!r}; choose one of {tuple(SAMPLER_REGISTRY)}")
    return SAMPLER_REGISTRY[key]


@register_sampler
class DDPM(Sampler):
    """Ancestral sampling with the learned-range variance (the authors' default, 250 steps)."""

    name = "ddpm"
    default_steps = 250
    uses_noise = True

    def step(self, j, x, model_out, noise):
        return ddpm_step(self.s, j, x, model_out, noise)


@register_sampler
class DDIM(Sampler):
    """DDIM(eta); eta 0 is deterministic, eta > 0 reads the noise."""

    name = "ddim"

    def step(self, j, x, model_out, noise):
        return ddim_step(self.s, j, x, model_out, noise, self.eta)


@register_sampler
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M), multistep, on the eps prediction (the learned variance is ignored).

    Works in lambda = log(alpha / sigma) with alpha = sqrt(abar), sigma = sqrt(1 - abar) over the
    respaced timesteps; first order on the first step, second order after; the last step (to the
    smallest kept timestep) returns the data prediction.
    """

    name = "dpm++2m"
    aliases = ("dpmpp2m", "dpm-solver++", "dpmsolver++")

    def __init__(self, s: Schedule, eta: float = 0.0):
        super().__init__(s, eta)
        self.alpha = np.sqrt(s.alphas_cumprod)
        self.sigma = np.sqrt(1.0 - s.alphas_cumprod)
        self.lam = detmath.log64(self.alpha) - detmath.log64(self.sigma)
        self.prev_x0 = None
        self.prev_h = None

    def data_prediction(self, j: int, x: np.ndarray, model_out: np.ndarray) -> np.ndarray:
        """x0 = (x - sigma eps) / alpha at step j, float32."""
        eps = model_out[:, :x.shape[1]]
        return ((x - _f32(self.sigma[j]) * eps) / _f32(self.alpha[j])).astype(np.float32)

    def multistep_update(self, j: int, x: np.ndarray, x0: np.ndarray, prev_x0: np.ndarray | None,
                         prev_h: float | None) -> np.ndarray:
        """x at step j - 1 from x at step j: first order (prev_x0 None) or second order with the data
        prediction of step j + 1 (prev_h: its log-SNR step)."""
        h = self.lam[j - 1] - self.lam[j]
        ratio = _f32(self.sigma[j - 1] / self.sigma[j])
        coef = _f32(self.alpha[j - 1] * -detmath.expm1_64(-h))
        if prev_x0 is None:
            d = x0
        else:
            r = prev_h / h
            d = _f32(1 + 1 / (2 * r)) * x0 - _f32(1 / (2 * r)) * prev_x0
        return (ratio * x + coef * d).astype(np.float32)

    def step(self, j: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        x0 = self.data_prediction(j, x, model_out)
        if j == 0:
            return x0
        out = self.multistep_update(j, x, x0, self.prev_x0, self.prev_h)
        self.prev_x0, self.prev_h = x0, self.lam[j - 1] - self.lam[j]
        return out


@register_sampler
class UniPC(DPMSolverPP2M):
    """UniPC (Zhao et al. 2023, arXiv 2302.04867), multistep, data prediction, B(h) = expm1(h)
    ("bh2"), order 2: the predictor UniP-2 (first order on the first step) and the corrector UniC-2.

    The predictor with B(h) = expm1(h) and its coefficient 1/2 is DPM-Solver++(2M) (the same update,
    bit for bit). The corrector costs no network evaluation: the model output at the predicted point
    of step j - 1, which the predictor of step j - 1 needs anyway, corrects that point before the
    predictor runs from it. It is added as an increment to the x it is given (x + corrected -
    predicted), so a caller that changed x after the step (inpainting re-imposes the known region)
    keeps its change. The last step returns the data prediction, as DPM-Solver++(2M)'s does, so the
    step into t_0 goes uncorrected (the reference implementation's corrected point there is not used
    either: its last update to sigma = 0 returns the data prediction of the uncorrected point).
    """

    name = "unipc"
    aliases = ("unipc-bh2", "unipc2m", "uni-pc")

    def __init__(self, s: Schedule, eta: float = 0.0):
        super().__init__(s, eta)
        self.history: list[tuple[int, np.ndarray]] = []  # (step, data prediction) of the last two steps

    def corrector_coefficients(self, j: int) -> tuple[float, float]:
        """(c_t, c_1) of the correction c_t (x0_j - m0) + c_1 (m1 - m0) of the point of step j, where
        m0, m1 are the data predictions of steps j + 1, j + 2 (c_1 = 0 without step j + 2).

        UniC with h = lambda_j - lambda_{j+1}, hh = -h (data prediction), B = expm1(hh): corrected =
        x_j~ - alpha_j B (a_1 (m1 - m0) / r + a_t (x0_j - m0)), r = (lambda_{j+2} - lambda_{j+1}) / h,
        with [[1, 1], [r, 1]] [a_1, a_t] = [phi_2 / phi_1, 2 phi_3 / phi_1] (phi_k of hh); without
        step j + 2, a_t = 1/2. The predictor's point was x_j~ - alpha_j B (1/2) (m1 - m0) / r (UniP-2)
        or x_j~ (first order), hence the increments below.
        """
        h = self.lam[j] - self.lam[j + 1]
        hh = -h
        big_b = detmath.expm1_64(hh)
        scale = -self.alpha[j] * big_b
        if len(self.history) < 2:
            return float(scale * 0.5), 0.0
        r = (self.lam[j + 2] - self.lam[j + 1]) / h
        phi1, phi2, phi3 = (detmath.phi64(k, hh) for k in (1, 2, 3))
        b1, b2 = phi2 / phi1, 2.0 * phi3 / phi1
        a1 = (b1 - b2) / (1.0 - r)
        a_t = b1 - a1
        return float(scale * a_t), float(scale * (a1 - 0.5) / r)

    def step(self, j: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        x0 = self.data_prediction(j, x, model_out)  # at the point given (the reference does the same)
        if j == 0:
            return x0
        if not self.history or self.history[-1][0] != j + 1:
            self.history = []  # a fresh start (or a run that did not come from step j + 1)
        if self.history:
            m0 = self.history[-1][1]
            c_t, c_1 = self.corrector_coefficients(j)
            x = x + _f32(c_t) * (x0 - m0)
            if len(self.history) == 2:
                x = x + _f32(c_1) * (self.history[0][1] - m0)
            x = x.astype(np.float32, copy=False)
        prev_x0 = self.history[-1][1] if self.history else None
        prev_h = self.lam[j] - self.lam[j + 1] if self.history else None
        out = self.multistep_update(j, x, x0, prev_x0, prev_h)
        self.history = (self.history + [(j, x0)])[-2:]
        return out


def guided_model_output(model, x: np.ndarray, t: int, labels: np.ndarray, cfg_scale: float) -> np.ndarray:
    """The authors' classifier-free guidance: run [x, x] with labels [y, null]; mix the first
    ``guided_channels`` eps channels; every other channel comes from the conditional half.
    Guidance applies only for cfg_scale > 1, as in the authors' sampler.
    """
    b = x.shape[0]
    if cfg_scale <= 1.0:
        return model(x, np.full(b, t, dtype=np.int64), labels)
    xx = np.concatenate([x, x], axis=0)
    yy = np.concatenate([labels, np.full(b, model.null_label, dtype=np.int64)])
    out = model(xx, np.full(2 * b, t, dtype=np.int64), yy)
    return guidance_mix(out[:b], out[b:], model.config.guided_channels, cfg_scale)


def guidance_mix(cond: np.ndarray, uncond: np.ndarray, g: int, cfg_scale: float) -> np.ndarray:
    """uncond + s (cond - uncond) on the first g channels; the others from cond."""
    guided = cond.copy()
    guided[:, :g] = uncond[:, :g] + np.float32(cfg_scale) * (cond[:, :g] - uncond[:, :g])
    return guided


MAX_SEED = 2**64 - 1


def image_seeds(n: int, seed: int | None = 0, seeds=None) -> list[int]:
    """The per-image seeds of n images: ``seeds`` as given (one non-negative int per image), or
    ``seed + k`` for image k. Raises InputError for anything else."""
    if seeds is not None:
        if isinstance(seeds, (int, np.integer)) or isinstance(seeds, (str, bytes)):
            raise InputError(f"seeds must be a list of integers (one per image), got {seeds!r}")
        seeds = list(seeds)
        if len(seeds) != n:
            raise InputError(f"seeds has {len(seeds)} entries but there are {n} images; give one seed per image")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED:
                raise InputError(f"every seed must be an integer in 0..2**64-1, got {s!r}")
        return [int(s) for s in seeds]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED - max(n - 1, 0):
        raise InputError(f"seed must be a non-negative integer (image k gets seed + k, at most 2**64-1), got {seed!r}")
    return [int(seed) + k for k in range(n)]


SAMPLERS = tuple(SAMPLER_REGISTRY)  # the registered names, in registration order


def check_guidance_interval(interval) -> tuple[int, int] | None:
    """None, or (lo, hi) with 0 <= lo <= hi <= 999 (original timesteps, inclusive); InputError else."""
    if interval is None:
        return None
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        raise InputError(f"guidance_interval must be a pair (lo, hi) of timesteps, got {interval!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise InputError(f"guidance_interval bounds must be numbers, got {interval!r}")
    if not 0 <= lo <= hi <= NUM_TRAIN_TIMESTEPS - 1:
        raise InputError(f"guidance_interval must satisfy 0 <= lo <= hi <= {NUM_TRAIN_TIMESTEPS - 1}, "
                         f"got {interval!r}")
    return lo, hi


def check_guidance_args(cfg_scale, eta, guidance_interval) -> tuple[int, int] | None:
    """InputError unless cfg_scale and eta are finite numbers >= 0; the checked guidance interval."""
    for name, value in (("cfg_scale", cfg_scale), ("eta", eta)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return check_guidance_interval(guidance_interval)


def sample(model, class_labels, steps=None, sampler: str | None = None, cfg_scale: float = 4.0, seed: int = 0,
           eta: float = 0.0, callback: Callable[[int, int, np.ndarray], None] | None = None,
           seeds=None, guidance_interval=None, schedule: str | None = None, cache=None, guidance_reuse=None,
           speed: str | None = None, stats: dict | None = None) -> np.ndarray:
    """Sample latents (B, C, H, W) float32 for standard class ids (mapped through the model's label map).

    steps: int N (uniform respacing), "ddimN" (integer stride), a list of timesteps, or None for the
    sampler's default (ddpm 250, ddim, dpm++2m and unipc 50). sampler: a name of :data:`SAMPLER_REGISTRY`
    ("ddpm" by default, "ddim" with eta, "dpm++2m", "unipc"). Image k uses seed ``seeds[k]`` when seeds are
    given, else ``seed + k`` (see the randomness contract above): its latents do not depend on the
    other images of the batch. guidance_interval=(lo, hi): classifier-free guidance only at steps
    whose original timestep t has lo <= t <= hi (Kynkaanniemi et al., 2024); the other steps run the
    conditional model alone (half the batch). None (default) or (0, 999) is plain guided sampling,
    bit for bit.

    Doing less work (all off by default; see :mod:`terdit_edge.stepcache` and docs/performance.md):
    schedule: the name of a shipped searched timestep schedule (``named_schedules()``; steps must
    then be None or its length). cache: a step-cache spec ("fixed:3", "adaptive:0.1,order=1", ...).
    guidance_reuse: compute the unconditional branch on fewer guided steps ("fixed:2", ...).
    speed: "exact" (default), "balanced" or "fast": a preset (:data:`terdit_edge.speed.PRESETS`)
    that fills in sampler, steps, schedule, cache and guidance_reuse; any of them given explicitly
    (not None) wins. stats: a dict, filled with ``network_evals`` (full network evaluations, one per
    image and guidance branch), ``forecast_evals`` (evaluations the step cache forecast) and
    ``uncond_reused`` (unconditional evaluations guidance reuse replaced) and ``per_step`` (a list of
    (full, forecast) evaluations of each step).
    callback(step_index, total, latents) runs after each step; raise in it to cancel.
    """
    from .speed import apply_preset
    from .stepcache import GuidanceReuse, StepCache, parse_spec

    chosen = apply_preset(speed, sampler=sampler, steps=steps, schedule=schedule, cache=cache,
                          guidance_reuse=guidance_reuse)
    sampler = "ddpm" if chosen["sampler"] is None else chosen["sampler"]
    steps, schedule = chosen["steps"], chosen["schedule"]
    cls = sampler_class(sampler)
    interval = check_guidance_args(cfg_scale, eta, guidance_interval)
    cache_spec = parse_spec(chosen["cache"], "cache")
    reuse_spec = parse_spec(chosen["guidance_reuse"], "guidance_reuse", kinds=("fixed",))
    labels = model.map_labels(class_labels)
    seed_list = image_seeds(len(labels), seed, seeds)
    if schedule is not None:
        ts = schedule_timesteps(schedule)
        if steps is not None and steps != len(ts) and respaced_timesteps(steps) != ts:
            raise InputError(f"schedule {schedule!r} has {len(ts)} steps; give no steps with it (got {steps!r})")
        steps = ts
    sched = Schedule.create(cls.default_steps if steps is None else steps)
    cfg = model.config
    image_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    shape = (len(labels), *image_shape)
    rngs = [np.random.default_rng(s) for s in seed_list]  # one stream per image (the contract)
    stats = {} if stats is None else stats
    for key in ("network_evals", "forecast_evals", "uncond_reused"):
        stats.setdefault(key, 0)
    stats.setdefault("per_step", [])

    def draw() -> np.ndarray:
        x = np.empty(shape, dtype=np.float32)
        for k, rng in enumerate(rngs):
            x[k] = rng.standard_normal(image_shape, dtype=np.float32)
        return x

    b = len(labels)
    total = len(sched)
    order = list(range(total - 1, -1, -1))
    guided_steps = [cfg_scale > 1.0 and (interval is None or interval[0] <= int(sched.timesteps[j]) <= interval[1])
                    for j in order]
    step_cache = StepCache(cache_spec, stats) if cache_spec is not None else None
    reuse = GuidanceReuse(reuse_spec, sum(guided_steps)) if reuse_spec is not None else None
    null = np.full(b, model.null_label, dtype=np.int64)
    g = cfg.guided_channels

    def forward(xx, t, yy, branches, step_index):
        if step_cache is None:
            stats["network_evals"] += xx.shape[0]
            return model(xx, np.full(xx.shape[0], t, dtype=np.int64), yy)
        keys = [(k, br) for br in branches for k in range(b)]
        return step_cache.forward(model, xx, t, yy, keys, step_index, total)

    x = draw()
    solver = cls(sched, eta=float(eta))
    gi = 0
    for step_index, j in enumerate(order):
        t = int(sched.timesteps[j])
        before = (stats["network_evals"], stats["forecast_evals"])
        if not guided_steps[step_index]:
            out = forward(x, t, labels, (0,), step_index)
        elif reuse is not None and not reuse.computes(gi):
            cond = forward(x, t, labels, (0,), step_index)
            stats["uncond_reused"] += b
            out = guidance_mix(cond, np.concatenate([reuse.uncond(t, cond[:, :g]), cond[:, g:]], axis=1), g,
                               cfg_scale)
        else:
            both = forward(np.concatenate([x, x], axis=0), t, np.concatenate([labels, null]), (0, 1), step_index)
            cond, uncond = both[:b], both[b:]
            if reuse is not None:
                reuse.record(t, uncond[:, :g] - cond[:, :g])
            out = guidance_mix(cond, uncond, g, cfg_scale)
        gi += guided_steps[step_index]
        stats["per_step"].append((stats["network_evals"] - before[0], stats["forecast_evals"] - before[1]))
        noise = draw()  # drawn every step (the contract)
        x = solver.step(j, x, out, noise)
        if callback is not None:
            callback(step_index, total, x)
    return x
