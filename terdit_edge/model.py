"""The ternary DiT ("DiT-LLaMA") forward pass on top of a compute backend: the one forward of every backend.

Names follow the paper and the checkpoints (x_embedder, t_embedder, adaLN, modulate, ...); the math
is in the order of docs/model.md §2. No SIMD and no I/O here: the ternary linear
layers and per-token ops go through ``self.backend`` (see :mod:`terdit_edge.kernels`), on the
backend's own arrays (NumPy arrays on the CPU, device arrays for CUDA): parameters are given to
the backend once (``backend.asarray``), workspaces come from it (``backend.empty``), and only the
input and the output cross to and from the host.
"""
from __future__ import annotations

import numpy as np

from . import detmath
from .config import TIMESTEP_FREQ_DIM, ModelConfig
from .errors import InputError
from .format import DIT_PREFIX, TditFile, float_param_shapes, ternary_layer_shapes
from .kernels import TernaryWeight, get_backend


def timestep_embedding(t: np.ndarray, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> np.ndarray:
    """Sinusoidal features of timesteps t (B,) -> float32 (B, dim), [cos, sin] as in DiT.

    The frequencies exp(-ln(max_period) i / half) and the float32 arguments t * freq are those of the
    authors' float32 code; exp, cos and sin are :mod:`terdit_edge.detmath`'s, so that the features have
    the same bits on every CPU (NumPy's own loops differ between CPUs in the last bit)."""
    half = dim // 2
    log_period = np.float32(detmath.log64(max_period))
    freqs = detmath.exp32(-log_period * np.arange(half, dtype=np.float32) / np.float32(half))
    args = t.astype(np.float32)[:, None] * freqs[None]
    return np.concatenate([detmath.cos64(args), detmath.sin64(args)], axis=-1).astype(np.float32)


def rope_tables(n_tokens: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, head_dim / 2) float32 of the 1-D rotary embedding (angle pos * theta^(-2i/hd)).

    theta^(-e) is exp(-e ln theta) and the angles are float32 products, as in the authors' float32
    code; exp, cos and sin are :mod:`terdit_edge.detmath`'s (the same bits on every CPU)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim)
    freqs = (np.float32(1) / detmath.exp32(exponents * np.float32(detmath.log64(theta)))).astype(np.float32)
    angles = np.outer(np.arange(n_tokens, dtype=np.float32), freqs).astype(np.float32)
    return detmath.cos64(angles).astype(np.float32), detmath.sin64(angles).astype(np.float32)


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    """(B, C, H, W) -> (B, T, C*p*p): tokens row-major over the grid, each flattened as (C, p_row, p_col)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // p) * (w // p), c * p * p))


def unpatchify(tokens: np.ndarray, p: int, channels: int, h: int, w: int) -> np.ndarray:
    """(B, T, p*p*C) with token vectors ordered (p_row, p_col, C) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, channels).transpose(0, 5, 1, 3, 2, 4)
    return np.ascontiguousarray(x.reshape(b, channels, h, w))


class TernaryDiT:
    """A loaded ternary DiT. Call it as ``model(x, t, y)``.

    x: float32 (B, C, H, W) noisy input; t: (B,) original timesteps 0..999; y: (B,) raw model label ids
    (``num_classes`` is the null label). Returns float32 (B, 2C, H, W): eps then the variance value v.
    """

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], ternary: dict[str, TernaryWeight],
                 backend, label_map: list[int] | None = None, label_map_name: str = "identity",
                 source: TditFile | None = None):
        self.config = config
        self.params = {name: backend.asarray(arr) for name, arr in params.items()}  # CPU: the arrays as given
        self.backend = backend
        self.ternary = {k: backend.prepare(w) for k, w in ternary.items()}
        # The adaLN layers see one conditioning row per image (M = batch), so quantizing their input
        # saves nothing, while their error would reach every token through shift/scale/gate: they
        # always run in fp32, also in int8 mode.
        self.cond_backend = backend
        if getattr(backend, "activations", "fp32") != "fp32":
            self.cond_backend = type(backend)(threads=backend.threads, activations="fp32")
        self.label_map = list(label_map) if label_map is not None else list(range(config.num_classes))
        self.label_map_name = label_map_name
        self.file = source  # keeps the memory map alive
        self.rope_cos, self.rope_sin = (backend.asarray(a) for a in
                                        rope_tables(config.n_tokens, config.head_dim, config.rope_theta))
        self._workspaces: dict[int, dict[str, np.ndarray]] = {}

    # --- conveniences for samplers and pipelines ----------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def map_labels(self, class_ids) -> np.ndarray:
        """Standard class ids (0..num_classes-1) -> the model's raw label ids, through the label map."""
        ids = np.asarray(class_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"class labels must be a non-empty 1-D list of ints, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"class labels must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.num_classes)
        if bad.any():
            raise InputError(f"class id {int(ids[bad][0])} is out of range: this model has classes "
                             f"0..{self.num_classes - 1}")
        return np.asarray(self.label_map, dtype=np.int64)[ids]

    def release_buffers(self) -> None:
        """Free the activation buffers kept for the last batch size (they are made again on the next
        call): the pipeline calls it before decoding, whose peak memory is the VAE's."""
        self._workspaces = {}

    # --- forward ------------------------------------------------------------------------------
    def _check_inputs(self, x, t, y):
        cfg = self.config
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise InputError(f"x must be a 4-D float32 array (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        b = x.shape[0]
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.shape[1:] != want or b < 1:
            raise InputError(f"x must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {x.shape}")
        t = np.asarray(t)
        y = np.asarray(y)
        if t.shape != (b,) or y.shape != (b,):
            raise InputError(f"t and y must have shape ({b},), got {t.shape} and {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > cfg.num_classes:
            raise InputError(f"labels y must be integers in 0..{cfg.num_classes} ({cfg.num_classes} = null label)")
        if not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 999:
            raise InputError("timesteps t must lie in 0..999")
        return np.ascontiguousarray(x, dtype=np.float32), t, y.astype(np.int64)

    def __call__(self, x: np.ndarray, t, y) -> np.ndarray:
        x, t, y = self._check_inputs(x, t, y)
        h, c_act = self.embed(x, t, y)
        for i in range(self.config.n_layers):
            h = self._block(i, h, c_act)
        return self.head(h, c_act)

    # The forward in three parts, for the step cache (terdit_edge/stepcache.py): embed -> blocks ->
    # head is ``__call__`` bit for bit; the cache runs the blocks on some rows only and forecasts
    # the blocks' residual (h after the blocks minus h before) for the others.
    def embed(self, x: np.ndarray, t, y):
        """(checked) inputs -> (h (B, T, D) the residual stream before the first block, c_act (B, cond_dim))."""
        cfg, p, be = self.config, self.config.patch_size, self.backend
        bsz = x.shape[0]
        n_tok, d = cfg.n_tokens, cfg.dim
        P = self.params
        # Batch invariance (docs/reproducibility.md): every image's rows go through calls whose
        # shapes do not depend on the batch. The conditioning layers see one row per image and run
        # image by image; token layers run on the whole batch where the backend promises per-row
        # results for calls of that many rows per image, else image by image too.

        h = be.dense(be.asarray(patchify(x, p).reshape(bsz * n_tok, -1)), P["x_embedder.weight"],
                     P["x_embedder.bias"], rows_per_image=n_tok)
        h = be.asarray(h).reshape(bsz, n_tok, d)  # the residual stream (B, T, D)

        t_emb = be.dense(be.asarray(timestep_embedding(t)), P["t_embedder.mlp.0.weight"],
                         P["t_embedder.mlp.0.bias"], rows_per_image=1)
        t_emb = be.dense(be.silu(t_emb), P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"],
                         rows_per_image=1)  # (B, cond_dim)
        c_act = be.condition(t_emb, P["y_embedder.embedding_table.weight"], y)  # silu(t_emb + table[y]) (B, cond_dim)
        return h, c_act

    def run_blocks(self, h, c_act):
        """Every block on the residual stream h (B, T, D), in place; returns h."""
        for i in range(self.config.n_layers):
            h = self._block(i, h, c_act)
        return h

    def head(self, h, c_act) -> np.ndarray:
        """The final layer: residual stream (B, T, D) -> host float32 (B, 2C, H, W)."""
        cfg, p, be, P = self.config, self.config.patch_size, self.backend, self.params
        bsz, n_tok, d = h.shape
        shift, scale = be.modulation(be.dense(c_act, P["final_layer.adaLN_modulation.1.weight"],
                                              P["final_layer.adaLN_modulation.1.bias"], rows_per_image=1), 2)
        hn = be.layernorm_modulate(h, shift, scale, 1e-6)  # LayerNorm(h) * (1 + scale) + shift (B, T, D)
        out = be.dense(hn.reshape(bsz * n_tok, d), P["final_layer.linear.weight"], P["final_layer.linear.bias"],
                       rows_per_image=n_tok)  # (B T, p p 2C)
        out = be.to_host(out)
        return unpatchify(out.reshape(bsz, n_tok, -1), p, cfg.out_channels, cfg.input_size, cfg.input_size)

    def first_block_input(self, h, c_act) -> np.ndarray:
        """The first block's modulated attention input (B, T, D) on the host (a copy): the cheap
        signal of the step cache's adaptive policy (TeaCache). Costs one conditioning layer and
        one normalisation, no token layer."""
        cfg, be, P, W = self.config, self.backend, self.params, self.ternary
        bsz = h.shape[0]
        mod = be.rmsnorm(self._ternary(c_act, W["layers.0.adaLN_modulation.1"], be.empty((bsz, 6 * cfg.dim)), 1,
                                       self.cond_backend), P["layers.0.adaLN_modulation.2.weight"], cfg.norm_eps)
        shift, scale = be.modulation(mod, 6)[:2]
        hn = be.rmsnorm_modulate(h, P["layers.0.attention_norm.weight"], shift, scale, cfg.norm_eps,
                                 out=be.empty(h.shape))
        return np.array(be.to_host(hn), dtype=np.float32, copy=True)

    def _ternary(self, x, w, out, rows_per_image: int, backend=None):
        """backend.ternary_matmul(x, w, out) with x (B * rows_per_image, K) (or ``backend.quantize(x)``),
        computed so that each image's rows give the same bits whatever the batch: in one call when
        the backend promises per-row results for calls of rows_per_image rows or more, else image by image."""
        be = backend or self.backend
        if rows_per_image >= be.invariant_min_rows:
            return be.ternary_matmul(x, w, out=out)
        for r0 in range(0, x.shape[0], rows_per_image):
            be.ternary_matmul(x[r0:r0 + rows_per_image], w, out=out[r0:r0 + rows_per_image])
        return out

    def _workspace(self, bsz: int) -> dict[str, np.ndarray]:
        """Activation buffers for a batch size, allocated once and reused by every block and step."""
        ws = self._workspaces.get(bsz)
        if ws is None:
            cfg = self.config
            rows = bsz * cfg.n_tokens
            e = self.backend.empty  # float32 buffers where the backend computes (host or device memory)
            ws = {"hn": e((bsz, cfg.n_tokens, cfg.dim)), "q": e((rows, cfg.dim)), "k": e((rows, cfg.kv_dim)),
                  "v": e((rows, cfg.kv_dim)), "att": e((rows, cfg.dim)), "o": e((rows, cfg.dim)),
                  "a": e((rows, cfg.ffn_dim)), "g": e((rows, cfg.ffn_dim)), "mod": e((bsz, 6 * cfg.dim))}
            self._workspaces = {bsz: ws}  # keep only the latest batch size: bounded memory
        return ws

    def _block(self, i: int, h, c_act):
        """One DiT-LLaMA block, updating the residual stream h (B, T, D) in place."""
        cfg, be, P, W = self.config, self.backend, self.params, self.ternary
        pre = f"layers.{i}."
        bsz, n_tok, d = h.shape
        hd = cfg.head_dim
        ws = self._workspace(bsz)
        rows = bsz * n_tok

        mod = be.rmsnorm(self._ternary(c_act, W[pre + "adaLN_modulation.1"], ws["mod"], 1, self.cond_backend),
                         P[pre + "adaLN_modulation.2.weight"], cfg.norm_eps)  # (B, 6 D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = be.modulation(mod, 6)  # (B, D) each

        # attention
        hn = be.rmsnorm_modulate(h, P[pre + "attention_norm.weight"], shift_msa, scale_msa, cfg.norm_eps,
                                 out=ws["hn"]).reshape(rows, d)  # (B T, D)
        xq = be.quantize(hn)  # in integer modes: quantized once for the three layers that read hn
        q = self._ternary(xq, W[pre + "attention.wq"], ws["q"], n_tok)
        k = self._ternary(xq, W[pre + "attention.wk"], ws["k"], n_tok)
        v = self._ternary(xq, W[pre + "attention.wv"], ws["v"], n_tok)  # q (B T, D); k, v (B T, D_kv)
        if cfg.qk_norm:
            q = be.layernorm(q, P[pre + "attention.q_norm.weight"], P[pre + "attention.q_norm.bias"], 1e-5)
            k = be.layernorm(k, P[pre + "attention.k_norm.weight"], P[pre + "attention.k_norm.bias"], 1e-5)
        q = q.reshape(bsz, n_tok, cfg.n_heads, hd)
        k = k.reshape(bsz, n_tok, cfg.n_kv_heads, hd)
        v = v.reshape(bsz, n_tok, cfg.n_kv_heads, hd)  # q (B, T, H, hd); k, v (B, T, H_kv, hd)
        be.rope(q, self.rope_cos, self.rope_sin)
        be.rope(k, self.rope_cos, self.rope_sin)
        att = be.attention(q, k, v, out=ws["att"].reshape(bsz, n_tok, cfg.n_heads, hd)).reshape(rows, d)  # (B T, D)
        o = self._ternary(att, W[pre + "attention.wo"], ws["o"], n_tok)
        be.add_gated(h, gate_msa, o.reshape(bsz, n_tok, d))  # h (B, T, D) += gate (B, 1, D) * o

        # feed-forward (SwiGLU)
        hn = be.rmsnorm_modulate(h, P[pre + "ffn_norm.weight"], shift_mlp, scale_mlp, cfg.norm_eps,
                                 out=ws["hn"]).reshape(rows, d)
        xq = be.quantize(hn)
        a = self._ternary(xq, W[pre + "feed_forward.w1"], ws["a"], n_tok)
        g = self._ternary(xq, W[pre + "feed_forward.w3"], ws["g"], n_tok)  # a, g (B T, F)
        be.swiglu(a, g, out=a)
        o = self._ternary(a, W[pre + "feed_forward.w2"], ws["o"], n_tok)  # (B T, D)
        be.add_gated(h, gate_mlp, o.reshape(bsz, n_tok, d))
        return h


def model_from_file(tf: TditFile, backend: str = "auto", activations: str = "fp32",
                    threads: int | None = None, attention: str = "fp32") -> TernaryDiT:
    """Build a TernaryDiT from a validated, mapped file (weights stay in the mapping)."""
    cfg = tf.config
    be = get_backend(backend, threads=threads, activations=activations, attention=attention)
    params = {}
    for name in float_param_shapes(cfg):
        arr = tf.tensors[DIT_PREFIX + name]
        # float32 tensors stay views of the mapping; fp16 ones are widened once (small: no ternary weight is float)
        params[name] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    ternary = {}
    for name, (n, k) in ternary_layer_shapes(cfg).items():
        bias = params.pop(name + ".bias", None)
        ternary[name] = TernaryWeight(packed=tf.tensors[DIT_PREFIX + name + ".qweight"], n=n, k=k,
                                      alpha=float(tf.tensors[DIT_PREFIX + name + ".alpha"][0]),
                                      bias=bias, name=name)
    return TernaryDiT(cfg, params, ternary, be, label_map=tf.label_map, label_map_name=tf.label_map_name,
                      source=tf)
