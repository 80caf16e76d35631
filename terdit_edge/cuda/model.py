"""The ternary DiT forward on a CUDA device: weights uploaded once, activations never leave the GPU.

:class:`CudaDiT` is a :class:`~terdit_edge.model.TernaryDiT` whose ``__call__`` runs every op as a
kernel of :mod:`terdit_edge.cuda.kernels` on device buffers. Per call only x, t and y go up
(B * (C*H*W + 2) numbers) and the model output comes back. The math and its order are those of
TernaryDiT (docs/model.md §2), so the NumPy model is its reference in the tests.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..config import TIMESTEP_FREQ_DIM, ModelConfig
from ..model import TernaryDiT, rope_tables
from ..packing import padded_k
from . import kernels as K


class DeviceTernaryWeight:
    """One ternary linear layer on the device: y = alpha * x Q^T + bias.

    words: device uint32 (N, K_pad / 16), the tdit2-k128 codes (2 bits per weight, not widened);
    bias: device float32 (N,) or None; alpha: float32 value.
    """

    __slots__ = ("words", "n", "k", "alpha", "bias", "name")

    def __init__(self, words, n: int, k: int, alpha: float, bias, name: str = ""):
        self.words, self.n, self.k, self.alpha, self.bias, self.name = words, n, k, alpha, bias, name

    @classmethod
    def upload(cls, w) -> "DeviceTernaryWeight":
        """Copy a host TernaryWeight to the device (its packed bytes as they are)."""
        bias = None if w.bias is None else cuda.to_device(np.ascontiguousarray(w.bias, dtype=np.float32))
        return cls(cuda.to_device(K.words_view(w.packed)), w.n, w.k, np.float32(w.alpha), bias, w.name)

    @property
    def nbytes(self) -> int:
        return self.words.size * 4 + (self.bias.size * 4 if self.bias is not None else 0)


class QuantizedActivations:
    """Device buffers for int8 activations of up to `rows` rows of width k (reused across layers)."""

    def __init__(self, rows: int, k: int):
        self.words = cuda.device_array((rows, padded_k(k) // 4), dtype=np.uint32)
        self.row_sums = cuda.device_array(rows, dtype=np.int32)
        self.scales = cuda.device_array(rows, dtype=np.float32)

    def quantize(self, x) -> None:
        """Quantise x (rows, k) per row (absmax / 127), as reference.quantize_rows_int8."""
        K.quantize_rows(x, self.words, self.row_sums, self.scales)


def ternary_linear(x, w: DeviceTernaryWeight, y, activations: str, quantized: QuantizedActivations | None = None,
                   already_quantized: bool = False) -> None:
    """y (M, N) = alpha * x (M, K) Q^T + bias on the device.

    With activations "int8", x is quantised into `quantized` first, unless already_quantized says
    that buffer already holds this x (q, k and v, and w1 and w3, share one quantisation).
    """
    if activations == "int8":
        if quantized is None:
            quantized = QuantizedActivations(x.shape[0], x.shape[1])
        if not already_quantized:
            quantized.quantize(x)
        K.ternary_gemm_i8(quantized.words, quantized.row_sums, quantized.scales, w.words, w.k, w.alpha, w.bias,
                          y)
    else:
        K.ternary_gemm_f32(x, w.words, w.alpha, w.bias, y)


class CudaDiT(TernaryDiT):
    """A loaded ternary DiT running on the GPU. Call it as ``model(x, t, y)`` with host arrays.

    x: float32 (B, C, H, W); t: (B,) original timesteps 0..999; y: (B,) raw label ids. Returns a host
    float32 (B, 2C, H, W) array, as TernaryDiT does.
    """

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], ternary: dict, backend,
                 label_map: list[int] | None = None, label_map_name: str = "identity", source=None):
        # TernaryDiT.__init__ is not called: it would keep host copies and host workspaces.
        self.config = config
        self.backend = backend
        self.activations = backend.activations
        self.label_map = list(label_map) if label_map is not None else list(range(config.num_classes))
        self.label_map_name = label_map_name
        self.file = None  # everything is on the device; the host mapping may be closed
        self.params = {name: cuda.to_device(np.ascontiguousarray(arr, dtype=np.float32))
                       for name, arr in params.items()}
        self.ternary = {name: backend.prepare(w) for name, w in ternary.items()}
        cos, sin = rope_tables(config.n_tokens, config.head_dim, config.rope_theta)
        self.rope_cos, self.rope_sin = cuda.to_device(cos), cuda.to_device(sin)
        self._workspaces: dict[int, dict] = {}

    def weight_bytes(self) -> int:
        """Device memory held by the weights (packed ternary + float parameters + RoPE tables)."""
        total = sum(w.nbytes for w in self.ternary.values())
        total += sum(a.size * 4 for a in self.params.values())
        return total + 2 * self.rope_cos.size * 4

    def _workspace(self, bsz: int) -> dict:
        """Device activation buffers for one batch size, allocated once (only the latest size is kept)."""
        ws = self._workspaces.get(bsz)
        if ws is None:
            cfg = self.config
            rows = bsz * cfg.n_tokens
            p = cfg.patch_size
            e = cuda.device_array
            f32 = np.float32
            ws = {"x": e((bsz, cfg.in_channels, cfg.input_size, cfg.input_size), f32),
                  "t": e(bsz, f32), "y": e(bsz, np.int64),
                  "tokens": e((rows, cfg.in_channels * p * p), f32),
                  "h": e((rows, cfg.dim), f32), "hn": e((rows, cfg.dim), f32),
                  "tfreq": e((bsz, TIMESTEP_FREQ_DIM), f32), "t1": e((bsz, cfg.cond_dim), f32),
                  "t2": e((bsz, cfg.cond_dim), f32), "c_act": e((bsz, cfg.cond_dim), f32),
                  "mod": e((bsz, 6 * cfg.dim), f32), "final_mod": e((bsz, 2 * cfg.dim), f32),
                  "q": e((rows, cfg.dim), f32), "k": e((rows, cfg.kv_dim), f32), "v": e((rows, cfg.kv_dim), f32),
                  "att": e((rows, cfg.dim), f32), "o": e((rows, cfg.dim), f32),
                  "a": e((rows, cfg.ffn_dim), f32), "g": e((rows, cfg.ffn_dim), f32),
                  "out_tokens": e((rows, p * p * cfg.out_channels), f32),
                  "out": e((bsz, cfg.out_channels, cfg.input_size, cfg.input_size), f32)}
            if self.activations == "int8":
                ws["quant_rows"] = QuantizedActivations(rows, cfg.dim)
                ws["quant_ffn"] = QuantizedActivations(rows, cfg.ffn_dim)
                ws["quant_cond"] = QuantizedActivations(bsz, cfg.cond_dim)
            self._workspaces = {bsz: ws}
        return ws

    def __call__(self, x: np.ndarray, t, y) -> np.ndarray:
        x, t, y = self._check_inputs(x, t, y)
        cfg, P = self.config, self.params
        bsz = x.shape[0]
        ws = self._workspace(bsz)
        ws["x"].copy_to_device(x)
        ws["t"].copy_to_device(np.ascontiguousarray(t, dtype=np.float32))
        ws["y"].copy_to_device(np.ascontiguousarray(y, dtype=np.int64))

        K.patchify(ws["x"], cfg.patch_size, ws["tokens"])
        h = ws["h"]
        K.dense(ws["tokens"], P["x_embedder.weight"], P["x_embedder.bias"], h)

        K.timestep_features(ws["t"], ws["tfreq"])
        K.dense(ws["tfreq"], P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"], ws["t1"])
        K.silu(ws["t1"], ws["t1"])
        K.dense(ws["t1"], P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"], ws["t2"])
        c_act = ws["c_act"]
        K.condition(ws["t2"], P["y_embedder.embedding_table.weight"], ws["y"], c_act)

        for i in range(cfg.n_layers):
            self._block(i, ws)

        d = cfg.dim
        K.dense(c_act, P["final_layer.adaLN_modulation.1.weight"], P["final_layer.adaLN_modulation.1.bias"],
                ws["final_mod"])
        K.layernorm(h, None, None, 1e-6, ws["hn"], mod=ws["final_mod"], shift_off=0, scale_off=d,
                    rows_per_batch=cfg.n_tokens)
        K.dense(ws["hn"], P["final_layer.linear.weight"], P["final_layer.linear.bias"], ws["out_tokens"])
        K.unpatchify(ws["out_tokens"], cfg.patch_size, ws["out"])
        return ws["out"].copy_to_host()

    def _block(self, i: int, ws: dict) -> None:
        """One DiT-LLaMA block on the device, updating the residual stream ws["h"] (B*T, D) in place."""
        cfg, P, W, act = self.config, self.params, self.ternary, self.activations
        pre = f"layers.{i}."
        d, n_tok = cfg.dim, cfg.n_tokens
        bsz = ws["mod"].shape[0]
        h, hn, mod = ws["h"], ws["hn"], ws["mod"]
        q_rows, q_ffn = ws.get("quant_rows"), ws.get("quant_ffn")

        # adaLN: mod = RMSNorm(Ternary(SiLU(c))), columns shift_msa, scale_msa, gate_msa, shift_mlp, ...
        ternary_linear(ws["c_act"], W[pre + "adaLN_modulation.1"], mod, act, ws.get("quant_cond"))
        K.rmsnorm(mod, P[pre + "adaLN_modulation.2.weight"], cfg.norm_eps, mod)

        # attention
        K.rmsnorm(h, P[pre + "attention_norm.weight"], cfg.norm_eps, hn, mod=mod, shift_off=0, scale_off=d,
                  rows_per_batch=n_tok)
        ternary_linear(hn, W[pre + "attention.wq"], ws["q"], act, q_rows)
        ternary_linear(hn, W[pre + "attention.wk"], ws["k"], act, q_rows, already_quantized=True)
        ternary_linear(hn, W[pre + "attention.wv"], ws["v"], act, q_rows, already_quantized=True)
        if cfg.qk_norm:
            K.layernorm(ws["q"], P[pre + "attention.q_norm.weight"], P[pre + "attention.q_norm.bias"], 1e-5, ws["q"])
            K.layernorm(ws["k"], P[pre + "attention.k_norm.weight"], P[pre + "attention.k_norm.bias"], 1e-5, ws["k"])
        K.rope(ws["q"], self.rope_cos, self.rope_sin, n_tok, cfg.head_dim)
        K.rope(ws["k"], self.rope_cos, self.rope_sin, n_tok, cfg.head_dim)
        K.attention(ws["q"], ws["k"], ws["v"], ws["att"], bsz, n_tok, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        ternary_linear(ws["att"], W[pre + "attention.wo"], ws["o"], act, q_rows)
        K.add_gated(h, mod, 2 * d, ws["o"], n_tok)

        # feed-forward (SwiGLU)
        K.rmsnorm(h, P[pre + "ffn_norm.weight"], cfg.norm_eps, hn, mod=mod, shift_off=3 * d, scale_off=4 * d,
                  rows_per_batch=n_tok)
        ternary_linear(hn, W[pre + "feed_forward.w1"], ws["a"], act, q_rows)
        ternary_linear(hn, W[pre + "feed_forward.w3"], ws["g"], act, q_rows, already_quantized=True)
        K.swiglu(ws["a"], ws["g"], ws["a"])
        ternary_linear(ws["a"], W[pre + "feed_forward.w2"], ws["o"], act, q_ffn)
        K.add_gated(h, mod, 5 * d, ws["o"], n_tok)
