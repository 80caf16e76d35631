"""Train the deeper judge model: a 12-block ternary DiT over 64 tokens per image, on the UCI digits.

The bundled digits model (examples/train_digits.py) has 4 blocks over 16 tokens (16 px, patch 4). A
method that reuses a block's output across steps (issue 24) behaves differently in a deep network, so
this script trains a deeper one with the same recipe (ternary QAT with a straight-through estimator,
EMA, learned-range variance with DiT's hybrid loss, label dropout for classifier-free guidance):

* 16 px images with patch 2: 8 x 8 = 64 tokens per image (the bundled model has 16);
* 12 blocks of width 64 (4 heads of 16, SwiGLU hidden 256): about 1.2M parameters, narrow so that it
  trains on one core in about two hours and converts to a file of a few hundred kB;
* augmentation: each training image is drawn, with probability ``--aug-prob``, through a small random
  affine map (rotation up to 8 degrees, scale 0.92..1.08, shift up to 0.6 px of the 8 x 8 original)
  applied while upscaling the 8 x 8 original to 16 x 16 (one bilinear interpolation, so augmented
  images are exactly as soft as the plain upscales; identity map = the plain upscale).

Everything else (model code, loss, schedule, checkpoint layout) is examples/train_digits.py's, so
``terdit-edge convert OUT model.tdit`` reads the result. The run checkpoints every ``--checkpoint-every``
steps (EMA, raw weights, optimizer and random-generator state) and ``--resume`` continues from the last
checkpoint with the same data order, so an interrupted run finishes with the weights of an uninterrupted
one (same torch build and thread count).

    PYTHONPATH=. python3 examples/train_digits_deep.py --out runs/digits_deep      # the committed model
    terdit-edge convert runs/digits_deep tests/data/digits_deep.tdit

Single thread by default (``--threads 1``): the weights depend on the thread count.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_digits as td  # noqa: E402


def load_digits_8x8() -> tuple[torch.Tensor, torch.Tensor]:
    """The UCI digits as (1797, 1, 8, 8) float32 in [0, 1] and their labels int64 (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None],
            torch.from_numpy(d.target.astype(np.int64)))


def augmented_upscale(small: torch.Tensor, size: int, gen: torch.Generator, prob: float,
                      max_rot_deg: float = 8.0, max_scale: float = 0.08, max_shift_px: float = 0.6) -> torch.Tensor:
    """Upscale (B, 1, 8, 8) in [0, 1] to (B, 1, size, size) in [-1, 1] through a random affine map.

    The map is drawn per image; images not chosen (probability 1 - prob) get the identity, which gives
    exactly ``F.interpolate(..., mode="bilinear", align_corners=False)`` (the plain training images).
    """
    b = len(small)
    use = (torch.rand(b, generator=gen) < prob).float()
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_rot_deg) * use
    scl = 1 + (torch.rand(b, generator=gen) * 2 - 1) * max_scale * use
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * max_shift_px / small.shape[-1]) * use[:, None]
    cos, sin = torch.cos(ang) / scl, torch.sin(ang) / scl
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, size, size), align_corners=False)
    big = F.grid_sample(small, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return big.clamp(0, 1) * 2 - 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/digits_deep")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--aug-prob", type=float, default=0.5, help="share of training images drawn through a random affine map")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (the learning rate still follows "
                        "--steps); the result equals the periodic checkpoint of a full run at that step")
    p.add_argument("--eval-samples", type=int, default=0, help="samples per class for the final check (0: skip)")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-cfg", type=float, default=4.0)
    p.add_argument("--eval-method", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--no-eval-clip", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if td.IMAGE_SIZE != 16:
        raise SystemExit("train_digits.IMAGE_SIZE must be 16")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    small, labels = load_digits_8x8()
    sched = td.Schedule()
    model = td.DiTLlama(args.dim, args.n_layers, args.n_heads, args.patch_size)
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, patch {args.patch_size} "
          f"({(16 // args.patch_size) ** 2} tokens), {n_params / 1e6:.2f}M parameters", flush=True)
    opt = td.make_optimizer(model, args.lr, args.weight_decay)
    lr_at = td.cosine_lr(args.lr, args.warmup, args.steps)

    gen = torch.Generator().manual_seed(args.seed)
    n = len(small)
    order, cursor, first_step, history = torch.randperm(n, generator=gen), 0, 0, []
    state_path = os.path.join(args.out, "train_state.pt")
    if args.resume and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        order, cursor, first_step, history = st["order"], st["cursor"], st["step"], st["history"]
        print(f"resumed at step {first_step}", flush=True)

    def checkpoint(step):
        td.save_checkpoint(args.out, model, ema, args)
        tmp = state_path + ".tmp"
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "order": order, "cursor": cursor, "step": step, "history": history}, tmp)
        os.replace(tmp, state_path)

    start, cpu_start = time.perf_counter(), time.process_time()
    log = {"mse": 0.0, "vb": 0.0, "loss": 0.0, "n": 0}
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    for step in range(first_step, stop):
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        x0 = augmented_upscale(small[idx], 16, gen, args.aug_prob)
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.class_dropout] = td.NUM_CLASSES
        t = torch.randint(0, td.NUM_TIMESTEPS, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, parts = td.training_loss(model, sched, x0, t, y, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay_now = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay_now)
        log["loss"] += loss.item()
        log["mse"] += parts["mse"]
        log["vb"] += parts["vb"]
        log["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == stop:
            k = log["n"]
            row = {"step": step + 1, "loss": log["loss"] / k, "mse": log["mse"] / k, "vb": log["vb"] / k,
                   "lr": lr_at(step), "elapsed_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}
            history.append(row)
            print(f"step {row['step']:6d}  loss {row['loss']:.4f}  mse {row['mse']:.4f}  vb {row['vb']:.4f}  "
                  f"lr {row['lr']:.2e}  elapsed {row['elapsed_s']:.0f}s (cpu {row['cpu_s']:.0f}s)", flush=True)
            log = {"mse": 0.0, "vb": 0.0, "loss": 0.0, "n": 0}
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < stop:
            checkpoint(step + 1)

    checkpoint(stop)
    report = {"train_seconds_this_run": time.perf_counter() - start, "history": history, "args": vars(args)}
    print(f"trained {stop} steps (of a {args.steps}-step schedule); wrote {args.out}", flush=True)
    if args.eval_samples > 0:
        images = augmented_upscale(small, 16, torch.Generator().manual_seed(0), 0.0)
        report["eval"] = td.run_evaluation(ema, images, labels, args)
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
