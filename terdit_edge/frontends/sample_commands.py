"""The `sample`, `merge`, `recover` and `fid` subcommands: their arguments and handlers (cli.py only wires them)."""
from __future__ import annotations

import sys

from ..argtypes import add_backend_arguments, checked, non_negative_int, positive_int
from ..settings import GenerationSettings


def _shard_selector(text: str):
    from ..scale.job import parse_shard_selector

    return parse_shard_selector(text)


def add_parsers(sub) -> None:
    """Add the four subparsers to ``sub`` (argparse subparsers of the terdit-edge command)."""
    s = sub.add_parser("sample", help="a resumable N-sample job in shards (local processes, Ray, or --shard K/N)",
                       description="Sample N images into fixed shards in DIR (resumable; the bytes do not depend on "
                                   "the engine or the number of workers). See docs/scale-out.md.")
    s.add_argument("model", nargs="?", default=None, help=".tdit file (default: the bundled digits model)")
    s.add_argument("-n", type=positive_int, required=True, help="number of samples")
    s.add_argument("--out", required=True, metavar="DIR", help="job directory (shards + manifest.json)")
    s.add_argument("--global-seed", type=non_negative_int, default=0, help="seed of the job (default 0)")
    s.add_argument("--labels", default="uniform", metavar="uniform|balanced|FILE.npy",
                   help="class of sample i: uniform (hashed from the global seed and i), balanced (i mod classes), "
                        "or entry i of a 1-D integer .npy file (default uniform)")
    # every setting but the seeds: a job derives each sample's seed from --global-seed
    GenerationSettings.add_arguments(s, scopes=("model", "sampling"))
    add_backend_arguments(s, threads_help="threads per worker (local default: cores / workers; ray default 1 = "
                                          "num_cpus per actor)")
    s.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard file (default 1000)")
    s.add_argument("--batch-size", type=positive_int, default=8,
                   help="images sampled together by a worker (default 8; does not change the images)")
    s.add_argument("--engine", choices=("local", "ray"), default="local")
    s.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes (local, default 1) or Ray actors (default: cluster CPUs / threads)")
    s.add_argument("--address", default=None, help="Ray cluster to join (ray://HOST:PORT, HOST:PORT or auto); "
                                                   "default: start a local Ray instance")
    s.add_argument("--shard", type=checked(str, _shard_selector, "shard_selector"), default=None, metavar="K/N",
                   help="do only the shards k with k %% N == K (Slurm arrays, Kubernetes indexed jobs)")
    s.add_argument("--retries", type=non_negative_int, default=3,
                   help="re-runs of a unit whose worker died (default 3)")
    s.add_argument("--png", action="store_true", help="also write DIR/png/INDEX.png with metadata")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--no-verify", action="store_true", help="skip the model file checksums when loading")

    m = sub.add_parser("merge", help="merge a job's shards into one ADM-evaluator .npz (streaming)")
    m.add_argument("dirs", nargs="+", metavar="DIR", help="job directory (or several with --shard parts of one job)")
    m.add_argument("-o", "--out", required=True, help="output .npz (arr_0 uint8 N,H,W,3; labels, indices, seeds)")
    m.add_argument("--no-verify", action="store_true", help="skip the shard SHA-256 checks")
    m.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("recover", help="rebuild a sampling job's lost or broken manifest.json from its shards",
                       description="Rebuild DIR/manifest.json from the shards that carry one job's identity (each "
                                   "shard records its job). Shards of other jobs, damaged ones and files without an "
                                   "identity are left out and listed; the job's `sample` command then resumes. "
                                   "See docs/scale-out.md.")
    r.add_argument("dir", metavar="DIR", help="job directory")
    r.add_argument("--job", default=None, metavar="ID",
                   help="the job id (or a prefix) to keep when DIR holds shards of several jobs")

    f = sub.add_parser("fid", help="FID of samples against a reference (images .npz or mu/sigma stats)",
                       description="Fréchet distance of feature statistics. Features: --features FILE.onnx (e.g. "
                                   "the FID Inception network, see docs/scale-out.md), or the bundled digits feature "
                                   "network for 16x16 digit images (a 'digits FID', not an ImageNet FID).")
    f.add_argument("samples", help=".npz with arr_0 uint8 (N, H, W, 3), or statistics (mu, sigma)")
    f.add_argument("reference", help=".npz with arr_0 images or mu/sigma statistics; 'digits' = the bundled "
                                     "statistics of the real scikit-learn digits")
    f.add_argument("--features", default=None, metavar="FILE.onnx",
                   help="feature network (default: the bundled digits network, for 16x16 images only)")
    f.add_argument("--batch-size", type=positive_int, default=250)
    f.add_argument("--save-stats", default=None, metavar="NPZ", help="also save the samples' mu/sigma")
    f.add_argument("--pr", action="store_true", help="also precision/recall (k=3; needs image .npz on both sides)")
    f.add_argument("--pr-samples", type=positive_int, default=10000, help="images per side used for P/R")
    f.add_argument("--threads", type=positive_int, default=None)
    f.add_argument("--exact", default=None, metavar="NPZ",
                   help="digits judge: the exact run of the same seeds and labels, for PSNR/SSIM per image")
    f.add_argument("--json", action="store_true", help="every metric with its standard error (digits judge)")
    f.add_argument("--no-progress", action="store_true")


def cmd_sample(args) -> int:
    from ..scale.engines import LocalEngine, RayEngine
    from ..scale.job import JobSpec, run_job

    shard = args.shard or (0, 1)
    spec = JobSpec(model_path=args.model, n=args.n, global_seed=args.global_seed, labels=args.labels,
                   settings=GenerationSettings.from_args(args), shard_size=args.shard_size,
                   batch_size=args.batch_size, backend=args.backend, verify=not args.no_verify).prepare()
    if args.engine == "local":
        if args.address:
            print("terdit-edge sample: --address is ignored by the local engine", file=sys.stderr)
        engine = LocalEngine(workers=args.workers or 1, threads=args.threads, retries=args.retries)
    else:
        engine = RayEngine(workers=args.workers, threads=args.threads, address=args.address, retries=args.retries)
    sel = f"; shards k %% {shard[1]} == {shard[0]}" if shard[1] > 1 else ""
    gs = spec.settings
    print(f"terdit-edge sample: {spec.n} samples of {spec.model_path} ({gs.sampler} {gs.step_spec} steps, cfg "
          f"{gs.cfg_scale}, labels {args.labels}, global seed {spec.global_seed}) in {spec.n_shards} shard(s) "
          f"of {spec.shard_size}{sel}; {engine.describe()}".replace("%%", "%"), file=sys.stderr)
    run_job(spec, args.out, engine, shard=shard, progress=not args.no_progress, png=args.png)
    return 0


def cmd_merge(args) -> int:
    from ..scale.merge import merge

    merge(args.dirs, args.out, verify=not args.no_verify, progress=not args.no_progress)
    return 0


def cmd_recover(args) -> int:
    from ..scale.recover import recover_manifest

    recover_manifest(args.dir, job_id=args.job)
    return 0


def cmd_fid(args) -> int:
    from ..fid import main_fid

    if args.reference == "digits" and args.features is None and not args.save_stats:
        from ..judge import main_judge  # the digits quality judge (docs/quality.md)

        return main_judge(args)

    return main_fid(args)


HANDLERS = {"sample": cmd_sample, "merge": cmd_merge, "recover": cmd_recover, "fid": cmd_fid}
