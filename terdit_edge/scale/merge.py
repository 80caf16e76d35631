"""Merge the shards of a sampling job into one .npz the ADM evaluator reads as is.

The output holds ``arr_0`` (uint8 (N, H, W, 3), C order, npy v1) and, after it, ``labels``,
``indices`` and ``seeds``. Images are copied shard by shard in slices of COPY_CHUNK bytes, so memory
stays bounded whatever N is; the output is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ..errors import InputError
from .job import JobError, file_sha256, read_manifest, shard_name
from .npzio import COPY_CHUNK, NpzArrayReader, NpzWriter, read_npz_array


def locate_shards(dirs) -> tuple[dict, list[str]]:
    """The common job of the directories and the path of each of its shards (JobError if one is
    missing or the directories hold different jobs)."""
    if not dirs:
        raise InputError("give at least one job directory")
    manifests = []
    for d in dirs:
        m = read_manifest(d)
        if m is None:
            raise JobError(f"{d}: no manifest.json; not a terdit-edge sampling job directory")
        manifests.append(m)
    job = manifests[0]["job"]
    for d, m in zip(dirs[1:], manifests[1:]):
        if m["job"] != job:
            raise JobError(f"{d} holds a different job than {dirs[0]}; only shards of one job can be merged")
    n_shards = -(-job["n"] // job["shard_size"])
    paths, records, missing = [], [], []
    for k in range(n_shards):
        for d, m in zip(dirs, manifests):
            rec = m["shards"].get(str(k))
            if rec is not None and os.path.exists(os.path.join(d, shard_name(k))):
                paths.append(os.path.join(d, shard_name(k)))
                records.append(rec)
                break
        else:
            missing.append(k)
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise JobError(f"{len(missing)} of {n_shards} shard(s) are not done ({shown}); run the same "
                       "`terdit-edge sample` command again to finish them (it resumes)")
    return {"job": job, "records": records, "manifest": manifests[0]}, paths


def merge(dirs, out: str, verify: bool = True, chunk: int = COPY_CHUNK, progress: bool = True,
          quiet: bool = False) -> dict:
    """Stream the shards of the job in ``dirs`` (one directory, or several holding disjoint
    ``--shard K/N`` parts of one job) into ``out``. Returns a summary dict."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    dirs = [os.fspath(d) for d in dirs]
    if not str(out).endswith(".npz"):
        raise InputError(f"the merged file must end in .npz, got {out!r}")
    info, paths = locate_shards(dirs)
    job, records = info["job"], info["records"]
    n = job["n"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="img", desc="merging", dynamic_ncols=True)
    shape = None
    for p, rec in zip(paths, records):
        if verify and file_sha256(p) != rec["sha256"]:
            raise JobError(f"{p}: its SHA-256 does not match the manifest (corrupted); run the `terdit-edge "
                           "sample` command again to redo it")
    with NpzArrayReader(paths[0], "arr_0") as r:
        shape = r.shape[1:]
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            with NpzWriter(f) as w:
                with w.array_stream("arr_0", (n,) + tuple(shape), np.uint8) as dst:
                    for p, rec in zip(paths, records):
                        with NpzArrayReader(p, "arr_0") as r:
                            if r.dtype != np.uint8 or r.shape[1:] != shape or len(r) != rec["count"]:
                                raise JobError(f"{p}: arr_0 is {r.dtype} {r.shape}; expected uint8 "
                                               f"({rec['count']},) + {shape}")
                            r.copy_data_to(dst, chunk=chunk)
                        if bar is not None:
                            bar.update(rec["count"])
                for key, dtype in (("labels", np.int64), ("indices", np.int64), ("seeds", np.uint64)):
                    w.write_array(key, np.concatenate([read_npz_array(p, key) for p in paths]).astype(dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        print(f"terdit-edge merge: wrote {out}: arr_0 uint8 {(n,) + tuple(shape)} from {len(paths)} shard(s)",
              file=sys.stderr)
    return {"out": out, "n": n, "shape": (n,) + tuple(shape), "shards": len(paths), "job": job}
