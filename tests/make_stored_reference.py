"""Write tests/data/parity_*: small converted TerDiT models and the outputs of the independent
PyTorch reference (tests/torch_reference.py) for them, so that parity can be checked where torch
is not installed (the arm64 CI userland, a board). Run from the repository root with torch:

    python tests/make_stored_reference.py

tests/test_stored_reference.py reads these files; it imports neither torch nor the converter.
The random models and inputs are seeded, so running this again reproduces the files' contents
(the .tdit bytes and the reference outputs up to torch's own run-to-run numerics).
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_reference as ref  # noqa: E402
from test_parity import CONFIGS, SAMPLING_CASES, forward_inputs, torch_forward  # noqa: E402

from terdit_edge.converters.terdit import convert  # noqa: E402

STORED = ("mha", "qk_norm_mqa")                        # K = 96 (not a packing multiple); qk_norm + MQA
CASES = ("ddim10-eta0-cfg4", "ddpm8-cfg4")             # guided DDIM and guided DDPM
LABELS = [1, 7]
SEED = 5


def main() -> None:
    out_dir = os.path.join(HERE, "data")
    os.makedirs(out_dir, exist_ok=True)
    for name in STORED:
        kw = CONFIGS[name]
        model = ref.random_model(**kw)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "ckpt")
            ref.save_checkpoint(model, ckpt, "released")
            tdit = os.path.join(out_dir, f"parity_{name}.tdit")
            convert(ckpt, tdit, label_map="identity", n_heads=kw["n_heads"], log=None)
            fresh = ref.DiTLlama(dim=kw["dim"], n_heads=kw["n_heads"], n_kv_heads=kw["n_kv_heads"],
                                 qk_norm=kw["qk_norm"])
            state = torch.load(os.path.join(ckpt, ref.RELEASED_FILE), weights_only=True)
            model = ref.load_released_state_dict(fresh, state).eval()
        x, t, y = forward_inputs(batch=3)
        arrays = {"x": x, "t": t, "y": y, "forward": torch_forward(model, x, t, y)}
        for case in CASES:
            c = SAMPLING_CASES[case]
            arrays[f"sample:{case}"] = ref.sample_latents(model, LABELS, c["steps"], c["sampler"],
                                                          c["cfg_scale"], seed=SEED, eta=c["eta"])
        np.savez_compressed(os.path.join(out_dir, f"parity_{name}.npz"), **arrays)
        print("wrote", tdit, "and its reference outputs")


if __name__ == "__main__":
    main()
