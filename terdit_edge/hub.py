"""The released TerDiT models one command away: download from the Hugging Face Hub, convert, cache.

``pull(name)`` downloads a released checkpoint (``model_args.pth`` and the EMA ternary weights) and
the SD-VAE its ``model_args.vae`` names, converts both into one .tdit file with the real converter,
verifies it, and keeps it as ``<cache>/<name>.tdit``; a name already converted is not downloaded
again. The cache is ``$TERDIT_EDGE_HOME``, else ``$XDG_CACHE_HOME/terdit-edge``, else
``~/.cache/terdit-edge``. Downloads go through ``huggingface_hub`` (the ``[hub]`` extra): resumable,
with its progress bars, its own cache (``HF_HOME``/``HF_HUB_CACHE``) and offline mode
(``HF_HUB_OFFLINE=1``). Converting needs torch (in the same extra), as ``terdit-edge convert`` does.

Which repository and files hold which model is data: ``terdit_edge/data/hub_models.json`` (or the
file named by ``$TERDIT_EDGE_HUB_TABLE``), so it can be corrected without code changes. When a
model's ``subfolder`` is not known, the repository's folders that hold both files are found, and the
one whose ``model_args.pth`` names the model and image size is chosen.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources

from .errors import ConvertError, FormatError, TerditError

__all__ = ["HubError", "hub_table", "cache_dir", "cached_path", "list_models", "pull"]


class HubError(TerditError):
    """A model could not be found, downloaded or converted from the Hub."""


def hub_table() -> dict:
    """The table of released models (see the module docstring)."""
    path = os.environ.get("TERDIT_EDGE_HUB_TABLE")
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
        else:
            table = json.loads(resources.files("terdit_edge").joinpath("data", "hub_models.json").read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"cannot read the hub model table {path or 'hub_models.json'}: {e}") from None
    if not isinstance(table, dict) or not isinstance(table.get("models"), dict):
        raise HubError("the hub model table must be a JSON object with a 'models' object")
    return table


def cache_dir() -> str:
    """Where converted models are kept (created on first use)."""
    d = os.environ.get("TERDIT_EDGE_HOME")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "terdit-edge")
    return d


def cached_path(name: str) -> str:
    return os.path.join(cache_dir(), f"{name}.tdit")


def _entry(name: str, table: dict) -> dict:
    models = table["models"]
    if name not in models:
        raise HubError(f"unknown model {name!r}; `terdit-edge pull --list` shows the names: {sorted(models)}")
    return models[name]


def list_models() -> list[dict]:
    """name, description, approximate download size and whether it is converted in the cache."""
    table = hub_table()
    rows = []
    for name, e in table["models"].items():
        path = cached_path(name)
        rows.append({"name": name, "description": e.get("description", ""), "download_mb": e.get("download_mb"),
                     "cached": os.path.isfile(path), "path": path,
                     "file_mb": round(os.path.getsize(path) / 1e6, 1) if os.path.isfile(path) else None})
    return rows


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("downloading models needs huggingface_hub: pip install 'terdit-edge[hub]'") from None
    return huggingface_hub


def _repo_files(hf, repo_id: str, revision: str | None) -> list[str]:
    """Files of a model repository: from the Hub, or from the local Hub cache when offline."""
    try:
        return list(hf.list_repo_files(repo_id, revision=revision))
    except Exception as online_error:  # offline, no network, or a Hub error: try the local cache
        try:
            root = hf.snapshot_download(repo_id, revision=revision, local_files_only=True)
        except Exception:
            raise HubError(f"cannot list {repo_id} on the Hub ({type(online_error).__name__}: "
                           f"{str(online_error).splitlines()[0] if str(online_error) else ''}) and it is not in the "
                           "local Hub cache; connect to the network or set HF_HUB_CACHE to a cache that holds "
                           "it") from None
        return [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                for d, _, files in os.walk(root) for f in files]


def _download(hf, repo_id: str, filename: str, revision: str | None, force: bool) -> str:
    try:
        return hf.hf_hub_download(repo_id, filename, revision=revision, force_download=force)
    except Exception as e:
        raise HubError(f"cannot download {filename} from {repo_id}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _read_args(path: str) -> dict:
    from .converters.torch_io import load_torch_file

    ns = load_torch_file(path)
    return dict(ns) if isinstance(ns, dict) else dict(vars(ns))


def _find_folder(hf, entry: dict, table: dict, revision, force, log) -> tuple[str, str, dict]:
    """(subfolder, local path of model_args.pth, its contents) of the entry's model in its repository."""
    repo, args_file, weights = entry["repo_id"], table["args_file"], table["weights_file"]
    if entry.get("subfolder") is not None:
        sub = entry["subfolder"].strip("/")
        path = _download(hf, repo, f"{sub}/{args_file}" if sub else args_file, revision, force)
        return sub, path, _read_args(path)
    files = set(_repo_files(hf, repo, revision))
    folders = sorted({f.rsplit("/", 1)[0] if "/" in f else "" for f in files if f.rsplit("/", 1)[-1] == args_file})
    folders = [d for d in folders if (f"{d}/{weights}" if d else weights) in files]
    if not folders:
        raise HubError(f"{repo} holds no folder with {args_file} and {weights}; correct the hub model table "
                       "(TERDIT_EDGE_HUB_TABLE) with the right subfolder and file names")
    seen = []
    for d in folders:
        path = _download(hf, repo, f"{d}/{args_file}" if d else args_file, revision, force)
        try:
            args = _read_args(path)
        except ConvertError as e:
            raise HubError(f"{repo}/{d}/{args_file} is not a readable model_args file ({e}); the download may be "
                           "corrupted: run `terdit-edge pull NAME --force`") from None
        seen.append(f"{d or '.'}: {args.get('model')} {args.get('image_size')}")
        if args.get("model") == entry["model"] and int(args.get("image_size", -1)) == int(entry["image_size"]):
            log(f"found {entry['model']} at {entry['image_size']} px in {repo}/{d}")
            return d, path, args
    raise HubError(f"no folder of {repo} holds {entry['model']} at {entry['image_size']} px (found {seen}); "
                   "correct the hub model table")


def pull(name: str, force: bool = False, revision: str | None = None, log=print) -> str:
    """Download, convert and cache a released model; returns the path of its .tdit file.

    A model already in the cache is verified (checksums) and returned without any download, unless
    ``force`` (which also re-downloads files that the Hub cache holds)."""
    from .format import read_tdit

    log = log or (lambda *a: None)
    table = hub_table()
    entry = _entry(name, table)
    out = cached_path(name)
    if os.path.isfile(out) and not force:
        try:
            cached = read_tdit(out, verify=True)
            if cached.vae_config_json is None or '"encoder": true' in cached.vae_config_json:
                log(f"{name}: already converted at {out}")
                return out
            log(f"{name}: the cached file predates the VAE encoder (needed by `edit`); converting again")
        except FormatError as e:
            log(f"{name}: the cached file is damaged ({e}); converting again")
    hf = _hf()
    sub, args_path, args = _find_folder(hf, entry, table, revision, force, log)
    weights_name = f"{sub}/{table['weights_file']}" if sub else table["weights_file"]
    log(f"downloading {entry['repo_id']}/{weights_name} (about {entry.get('download_mb', '?')} MB)")
    weights_path = _download(hf, entry["repo_id"], weights_name, revision, force)
    vae_kind = str(args.get("vae", "ema"))
    vae_repo = table["vae_repos"].get(vae_kind)
    if vae_repo is None:
        raise HubError(f"{name}: model_args names the VAE {vae_kind!r}, which the hub table does not know "
                       f"({sorted(table['vae_repos'])})")
    log(f"downloading the SD-VAE {vae_repo}")
    vae_paths = [_download(hf, vae_repo, f, None, force) for f in table["vae_files"]]

    from .converters.terdit import convert

    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as work:
        # the converter reads a checkpoint directory and a diffusers VAE folder: lay them out by links
        ck, vae = os.path.join(work, "ck"), os.path.join(work, "vae")
        os.makedirs(ck)
        os.makedirs(vae)
        _link(args_path, os.path.join(ck, table["args_file"]))
        _link(weights_path, os.path.join(ck, table["weights_file"]))
        for f, p in zip(table["vae_files"], vae_paths, strict=True):
            _link(p, os.path.join(vae, os.path.basename(f)))
        try:
            # the encoder too: `edit` (image-to-image, inpainting) encodes the input image
            convert(ck, out, vae=vae, vae_encoder=True, log=log)  # writes atomically and verifies its output
        except ConvertError as e:
            raise HubError(f"{name}: the downloaded files do not convert ({e}); if a download was interrupted "
                           "or damaged, run `terdit-edge pull NAME --force`") from None
    return out


def _link(src: str, dst: str) -> None:
    try:
        os.symlink(os.path.realpath(src), dst)
    except OSError:  # no symlinks (some file systems): copy
        shutil.copyfile(src, dst)
