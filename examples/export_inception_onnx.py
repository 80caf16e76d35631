"""Export the FID Inception network to ONNX once, on a machine with torch, for `terdit-edge fid`.

    pip install torch==2.13.0 pytorch-fid onnx onnxruntime
    python examples/export_inception_onnx.py --out inception_fid.onnx [--weights pt_inception-2015-12-05-6726825d.pth]

The network is pytorch-fid's ``InceptionV3([3])``: the FID Inception weights (a port of the
TensorFlow graph used by the ADM evaluator and TTUR), inputs resized to 299x299 bilinearly and scaled
to [-1, 1], the 2048-d pool_3 features out. The ONNX file takes the images exactly as sampling jobs
store them, uint8 (N, H, W, 3) with any N, H, W, and returns float32 (N, 2048). pytorch-fid
downloads its weights on first use; on a machine without network access pass the file with
``--weights`` (it is copied into torch's hub cache under the name pytorch-fid looks for). The script
checks onnxruntime against torch on random images before it finishes.

FID values from this network are close to, but not bit-identical with, the ADM evaluator's (TF
resize vs torch resize); for numbers comparable with published tables run the ADM evaluator on the
merged samples (docs/scale-out.md). Not run in this project's CI (it needs the weights file).
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="inception_fid.onnx")
    ap.add_argument("--weights", default=None, help=f"a local copy of {WEIGHTS_NAME}")
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()

    import torch
    from pytorch_fid.inception import InceptionV3

    if args.weights:
        dst = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            shutil.copyfile(args.weights, dst)

    class Uint8NHWC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            return self.net(x)[0].flatten(1)

    model = Uint8NHWC().eval()
    dummy = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.onnx.export(model, (dummy,), args.out, input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "N", 1: "H", 2: "W"}, "features": {0: "N"}},
                      opset_version=args.opset, dynamo=False)

    import onnxruntime as ort

    sess = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    test = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    got = sess.run(None, {"images": test})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(test)).numpy()
    err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))
    print(f"wrote {args.out}: uint8 (N, H, W, 3) -> float32 (N, {got.shape[1]}); onnxruntime vs torch max rel. "
          f"error {err:.2e}")
    if err > 1e-3:
        raise SystemExit("onnxruntime and torch disagree; do not use this file")


if __name__ == "__main__":
    main()
