"""The terdit-edge command line: argument parsing only; the work is done by the library.

Generation settings (sampler, steps, cfg, seeds, activations, ...) are the options of
:meth:`terdit_edge.settings.GenerationSettings.add_arguments`; this module names none of them.

Exit codes: 0 success, 1 a terdit-edge error (bad model file, bad input...), 2 bad command-line
arguments, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .._version import __version__
from ..argtypes import add_backend_arguments, int_in_range, non_negative_float, positive_int
from ..edit import EditSettings
from ..errors import TerditError
from ..kernels.base import ACTIVATION_MODES, ATTENTION_MODES
from ..settings import GenerationSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terdit-edge", description="Run ternary diffusion transformers (TerDiT) "
                                "on CPUs without PyTorch.")
    p.add_argument("--version", action="version", version=f"terdit-edge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images (default: the bundled digits model, every class)")
    g.add_argument("model", nargs="?", default=None, help=".tdit file (default: the bundled digits model)")
    g.add_argument("--class", dest="classes", action="append", default=None, metavar="ID_OR_NAME",
                   help="class id or name, repeatable (default: every class of a model with <= 100 classes)")
    _add_image_job_arguments(g, "out.png", "sampled", "a VAE .tdit file for a model file without an embedded VAE",
                             "decode in latent tiles of this size")
    g.add_argument("--save-latents", default=None, metavar="NPY", help="also save the sampled latents (.npy)")

    c = sub.add_parser("convert", help="convert a TerDiT checkpoint to a .tdit file (needs torch)")
    c.add_argument("src", help="checkpoint directory (model_args.pth + consolidated*.pth) or state-dict file")
    c.add_argument("out", help="output .tdit file")
    c.add_argument("--label-map", choices=("terdit", "identity"), default=None,
                   help="default: terdit for 1000-class models (the released models' string-sorted order), else identity")
    c.add_argument("--n-heads", type=positive_int, default=None, help="attention heads (default: model_args or 32)")
    c.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the float parameters")
    c.add_argument("--weights", default=None, help="which weights file of the directory to convert")
    c.add_argument("--image-size", type=positive_int, default=None, help="image size (default: model_args)")
    c.add_argument("--guided-channels", type=positive_int, default=None,
                   help="eps channels mixed by guidance (default 3 for latent TerDiT models, else all)")
    c.add_argument("--vae", default=None, metavar="VAE_SRC", help="embed this SD-VAE decoder in the file")
    c.add_argument("--vae-dtype", choices=("fp16", "fp32"), default="fp16")
    c.add_argument("--vae-encoder", action="store_true",
                   help="keep the VAE's encoder too (needed by `edit` on latent models)")

    v = sub.add_parser("convert-vae", help="convert an SD-VAE (diffusers folder or LDM file) to a VAE-only .tdit")
    v.add_argument("src")
    v.add_argument("out")
    v.add_argument("--vae-dtype", choices=("fp16", "fp32"), default="fp16")
    v.add_argument("--vae-encoder", action="store_true",
                   help="keep the VAE's encoder too (needed by `edit` on latent models)")

    h = sub.add_parser("pull", help="download a released TerDiT model from the Hugging Face Hub and convert it "
                       "(needs the [hub] extra)")
    h.add_argument("name", nargs="?", default=None, help="model name (see --list)")
    h.add_argument("--list", action="store_true", help="list the released models and what is cached")
    h.add_argument("--force", action="store_true", help="download and convert again")
    h.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model repository")
    s = sub.add_parser("serve", help="a resident HTTP server: job API, progress events, web page (needs the "
                       "[server] extra; docs/server.md)")
    s.add_argument("model", nargs="?", default=None, help=".tdit file (default: the bundled digits model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int_in_range(0, 65535, "port"), default=8000,
                   help="TCP port 0..65535 (default 8000; 0: a free one)")
    s.add_argument("--api-key-file", default=None, help="file of bearer keys, one per line (default: no auth)")
    s.add_argument("--max-queue", type=positive_int, default=32, help="queued jobs before 429 (default 32)")
    s.add_argument("--max-batch", type=positive_int, default=8, help="images sampled together (default 8)")
    s.add_argument("--batch-wait-ms", type=non_negative_float, default=20.0,
                   help="wait up to this long for more jobs to fill a batch (default 20)")
    s.add_argument("--max-n", type=positive_int, default=16, help="images per request (default 16)")
    s.add_argument("--max-steps", type=positive_int, default=1000, help="sampler steps per job (default 1000)")
    s.add_argument("--max-upload-bytes", type=positive_int, default=16 * 1024 * 1024,
                   help="body of an edit request with its pictures (default 16777216: 16 MiB)")
    s.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096,
                   help="pixels of an uploaded picture or mask (default 16777216: 4096 x 4096)")
    s.add_argument("--keep-seconds", type=non_negative_float, default=600.0,
                   help="finished jobs are kept this long (default 600)")
    s.add_argument("--keep-jobs", type=positive_int, default=256, help="at most this many finished jobs kept")
    s.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where accepted jobs and finished images are kept across restarts (SQLite; default: "
                        "$XDG_CACHE_HOME/terdit-edge/server, i.e. ~/.cache/terdit-edge/server)")
    s.add_argument("--ephemeral", action="store_true",
                   help="keep jobs in memory only: a restart loses queued and running jobs and finished images")
    add_backend_arguments(s)
    GenerationSettings.add_arguments(s, scopes=("model",))  # requests set the others
    s.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    s.add_argument("--access-log", action="store_true", help="log every request")

    _add_edit_parser(sub)

    i = sub.add_parser("info", help="CPU features and backend; with MODEL also the model file's contents")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--json", action="store_true")

    from .sample_commands import add_parsers as _add_sample_parsers  # sample, merge, fid (issue 13)
    _add_sample_parsers(sub)
    return p


def _cmd_info(args) -> int:
    from ..kernels import available_backends, batch_invariance, get_backend

    info = {"version": __version__, "backends": available_backends(), "batch_invariant": batch_invariance()}
    try:
        from ..kernels.cpu import cpu_features
        info["cpu"] = cpu_features()
    except ImportError:
        info["cpu"] = {"note": "compiled extension not built; CPU feature detection unavailable"}
    info["auto_backend"] = get_backend("auto").describe()
    from ..diffusion import SAMPLERS, named_schedules
    from ..speed import describe as describe_speeds
    info["samplers"] = list(SAMPLERS)
    info["schedules"] = list(named_schedules())
    info["speed_presets"] = describe_speeds()
    info["attention_modes"] = list(ATTENTION_MODES)  # --attention (a model setting); fp32 by default
    if args.model:
        from ..format import read_tdit
        tf = read_tdit(args.model)
        m = {"path": tf.path, "file_bytes": tf.file_size, "format_version": tf.metadata.get("format_version"),
             "packing": tf.metadata.get("packing"), "source": _public_source(tf.source)}
        if tf.config is not None:
            m.update(config=json.loads(tf.config.to_json()), float_dtype=tf.float_dtype,
                     label_map=tf.label_map_name,
                     tensor_bytes={"dit": sum(a.nbytes for k, a in tf.tensors.items() if k.startswith("dit."))})
        if tf.vae_config_json is not None:
            m["vae"] = {"config": json.loads(tf.vae_config_json), "dtype": tf.metadata.get("vae_dtype"),
                        "bytes": sum(a.nbytes for k, a in tf.tensors.items() if k.startswith("vae."))}
        else:
            m["vae"] = None
        info["model"] = m
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"terdit-edge {__version__}")
    cpu = info["cpu"]
    print("cpu: " + ", ".join(f"{k}={v}" for k, v in cpu.items()))
    print("backends: " + ", ".join(f"{k}: {v}" for k, v in info["backends"].items()))
    print(f"auto backend: {info['auto_backend']}")
    inv = info["batch_invariant"]
    print("batch-invariant images (same bytes in any batch, any thread count): "
          + ", ".join(f"{k}: {'yes' if v else 'not promised'}" for k, v in inv.items()))
    print(f"activation modes: {', '.join(ACTIVATION_MODES)} (--activations; fp32 matches PyTorch, int10/int8 are faster)")
    print(f"attention modes: {', '.join(ATTENTION_MODES)} (--attention; default fp32; int8 runs on the cython backend, "
          "within 1% of fp32)")
    print(f"samplers: {', '.join(info['samplers'])} (--sampler)")
    print(f"schedules: {', '.join(info['schedules'])} (--schedule NAME; each was searched for the sampler its "
          "name starts with)")
    print("speed presets (--speed; explicit options win):")
    for name, what in info["speed_presets"].items():
        print(f"  {name}: " + (what if isinstance(what, str) else ", ".join(f"{k} {v}" for k, v in what.items())))
    if "model" in info:
        m = info["model"]
        print(f"model file: {m['path']} ({m['file_bytes'] / 1e6:.1f} MB, format v{m['format_version']}, "
              f"packing {m['packing']})")
        if "config" in m:
            print("config: " + ", ".join(f"{k}={v}" for k, v in m["config"].items()))
            print(f"float params: {m['float_dtype']}; label map: {m['label_map']}")
        print("vae: " + (f"{m['vae']['dtype']}, {m['vae']['bytes'] / 1e6:.1f} MB, "
                         f"channels {m['vae']['config'].get('block_out_channels')}" if m["vae"] else "none"))
        if m["source"]:
            print(f"source: {_source_name(m['source'].get('path', ''))} ({m['source'].get('layout', '')})")
    return 0


def _check_out(out: str) -> None:
    """--out must be a .png in an existing directory; checked before the model loads and samples
    (on a large model a late failure wastes minutes), and again when saving."""
    if os.path.splitext(out)[1].lower() != ".png":
        raise TerditError(f"--out must name a .png file, got {out!r}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise TerditError(f"output directory {os.path.dirname(out)!r} does not exist")


def _source_name(path) -> str:
    """The checkpoint's name without the directories of the machine that converted it."""
    return os.path.basename(str(path).rstrip("/\\")) if path else ""


def _public_source(source):
    if not isinstance(source, dict):
        return source
    return {**source, "path": _source_name(source.get("path"))} if "path" in source else source


def _save_images(images, args, meta: dict) -> list[str]:
    from PIL import Image

    h = images[0].height
    factor = args.upscale or max(1, -(-64 // h))
    if factor > 1:
        images = [im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in images]
    out = args.out
    _check_out(out)
    root, ext = os.path.splitext(out)
    if args.grid or len(images) == 1:
        if len(images) > 1:
            cols = min(len(images), 10 if len(images) <= 10 else int(len(images) ** 0.5 + 0.999))
            rows = -(-len(images) // cols)
            w, hh = images[0].size
            grid = Image.new(images[0].mode, (cols * w, rows * hh))
            for k, im in enumerate(images):
                grid.paste(im, ((k % cols) * w, (k // cols) * hh))
            images, paths = [grid], [out]
        else:
            paths = [out]
    else:
        paths = [f"{root}-{k}{ext}" for k in range(len(images))]
    from ..pngmeta import png_info

    written = []
    for k, (im, path) in enumerate(zip(images, paths)):
        im.save(path, pnginfo=png_info(meta, k if len(paths) > 1 else None))
        written.append(path)
    return written


def _seed_summary(seeds: list[int]) -> str:
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def _cmd_generate(args) -> int:
    import numpy as np

    from ..pipeline import Pipeline

    t0 = time.time()
    settings = GenerationSettings.from_args(args)
    if not args.save_latents:
        _check_out(args.out)
    pipe = Pipeline.load(args.model, backend=args.backend, threads=args.threads, vae=args.vae,
                         verify=not args.no_verify, settings=settings)
    cfg = pipe.config
    if args.classes is None:
        if cfg.num_classes > 100:
            raise TerditError(f"this model has {cfg.num_classes} classes: choose with --class ID_OR_NAME "
                              "(e.g. --class 207 --class 'tabby cat')")
        classes = list(range(cfg.num_classes))
        if not args.grid and len(classes) > 1:
            args.grid = True
    else:
        classes = pipe.resolve_classes(args.classes)
    latents_only = cfg.latent and pipe.vae is None
    if latents_only and not args.save_latents:
        raise TerditError("this model samples SD-VAE latents but the file holds no VAE: embed one with "
                          "`terdit-edge convert ... --vae VAE_SRC`, pass --vae FILE, or use --save-latents NPY")
    seeds = settings.image_seeds(len(classes))
    print(f"model: {pipe.path} ({cfg.n_layers} layers, dim {cfg.dim}); backend "
          f"{pipe.model.backend.describe()}; {len(classes)} image(s), {settings.sampler} {settings.step_spec} steps, "
          f"cfg {settings.cfg_scale}, seeds {_seed_summary(seeds)}", file=sys.stderr)
    settings = settings.replace(seeds=seeds)
    latents = pipe.latents(classes, settings, progress=not args.no_progress, batch_size=args.batch_size)
    if args.save_latents:
        np.save(args.save_latents, latents)
        print(f"wrote {args.save_latents}", file=sys.stderr)
    if latents_only:
        return 0
    from ..images import to_pil
    images = [to_pil(pipe.decode(latents[k:k + 1], vae_tile=args.vae_tile)[0]) for k in range(len(classes))]
    from ..pngmeta import generation_metadata
    meta = generation_metadata(os.path.basename(pipe.path), classes, seeds, settings)
    paths = _save_images(images, args, meta)
    print(f"wrote {', '.join(paths)} in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


def _add_edit_parser(sub) -> None:
    """The `edit` subcommand: image-to-image (SDEdit) and, with --mask, inpainting (issue 27)."""
    e = sub.add_parser("edit", help="edit a picture toward a class: image-to-image, or inpainting with --mask")
    e.add_argument("image", help="input picture (PNG, JPEG, ...; gray, palette or RGB, alpha dropped)")
    e.add_argument("--model", default=None, help=".tdit file (default: the bundled digits model)")
    e.add_argument("--class", dest="classes", action="append", required=True, metavar="ID_OR_NAME",
                   help="class id or name, repeatable (one edited image per class)")
    e.add_argument("--mask", default=None, help="mask picture of the input's size: white = regenerate, black = keep")
    EditSettings.add_arguments(e)  # --strength, --mask-blur, --resample-jumps, --jump-length, --fit
    _add_image_job_arguments(e, "edit.png", "edited", "a VAE .tdit file (with its encoder) for a model file without one",
                             "encode and decode in latent tiles of this size")


def _add_image_job_arguments(p, out_default: str, verb: str, vae_help: str, tile_help: str) -> None:
    """The options `generate` and `edit` share: the generation settings, batching, output files,
    backend, VAE, progress and verification."""
    GenerationSettings.add_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images {verb} together (default: what fits in memory); the images do not depend on it")
    p.add_argument("--out", default=out_default, help="output PNG (several classes without --grid: OUT-0.png, ...)")
    p.add_argument("--grid", action="store_true", help="one PNG with all images in a row-major grid")
    p.add_argument("--upscale", type=positive_int, default=None,
                   help="nearest-neighbour upscaling factor for small images (default: to at least 64 px)")
    add_backend_arguments(p)
    p.add_argument("--vae", default=None, help=vae_help)
    p.add_argument("--vae-tile", type=positive_int, default=None, help=tile_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true", help="skip the model file checksums (slow storage)")


def _cmd_edit(args) -> int:
    from ..pipeline import Pipeline
    from ..pngmeta import generation_metadata

    t0 = time.time()
    settings = GenerationSettings.from_args(args)
    _check_out(args.out)
    pipe = Pipeline.load(args.model, backend=args.backend, threads=args.threads, vae=args.vae,
                         verify=not args.no_verify, settings=settings)
    classes = pipe.resolve_classes(args.classes)
    settings = settings.replace(seeds=settings.image_seeds(len(classes)))
    edit = EditSettings.from_args(args).for_mask(bool(args.mask))
    common = dict(seeds=settings.seeds, progress=not args.no_progress, vae_tile=args.vae_tile,
                  batch_size=args.batch_size, **settings.sample_kwargs(), **edit.edit_kwargs(bool(args.mask)))
    what = "inpainting" if args.mask else "image-to-image"
    print(f"model: {pipe.path}; {what} of {args.image}, strength {edit.strength:g}, {len(classes)} image(s), "
          f"{settings.sampler} {settings.step_spec} steps, cfg {settings.cfg_scale}, "
          f"seeds {_seed_summary(settings.seeds)}", file=sys.stderr)
    if args.mask:
        images = pipe.inpaint(args.image, args.mask, classes, **common)
    else:
        images = pipe.edit(args.image, classes, **common)
    meta = generation_metadata(os.path.basename(pipe.path), classes, settings.seeds, settings)
    meta.update(edit.png_items(bool(args.mask)))
    meta["source_image"] = os.path.basename(args.image)
    if args.mask:
        meta["mask"] = os.path.basename(args.mask)
    paths = _save_images(images, args, meta)
    print(f"wrote {', '.join(paths)} in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


def _cmd_pull(args) -> int:
    from ..hub import cache_dir, list_models, pull

    if args.list or args.name is None:
        print(f"released models (cache: {cache_dir()}):")
        for r in list_models():
            state = f"cached, {r['file_mb']} MB" if r["cached"] else f"download about {r['download_mb']} MB"
            print(f"  {r['name']:18s} {r['description']:34s} {state}")
        if args.name is None and not args.list:
            print("pull one with: terdit-edge pull NAME", file=sys.stderr)
        return 0
    path = pull(args.name, force=args.force, revision=args.revision, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def _cmd_convert(args) -> int:
    from ..converters.terdit import main_convert

    return main_convert(args)


def _cmd_convert_vae(args) -> int:
    from ..converters.vae import convert_vae_file

    convert_vae_file(args.src, args.out, dtype=args.vae_dtype, log=lambda m: print(m, file=sys.stderr),
                     encoder=args.vae_encoder)
    return 0


def _cmd_serve(args) -> int:
    from .server.main import serve_command

    return serve_command(args)


def _scale_handlers() -> dict:
    from .sample_commands import HANDLERS

    return HANDLERS


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = {"generate": _cmd_generate, "edit": _cmd_edit, "convert": _cmd_convert, "convert-vae": _cmd_convert_vae,
               "info": _cmd_info, "pull": _cmd_pull, "serve": _cmd_serve, **_scale_handlers()}[args.command]
    try:
        return handler(args)
    except TerditError as e:
        print(f"terdit-edge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("terdit-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
