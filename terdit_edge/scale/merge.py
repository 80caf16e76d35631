"""Merge the shards of a sampling job into one .npz the ADM evaluator reads as is.

The output holds ``arr_0`` (uint8 (N, H, W, 3), C order, npy v1) and, after it, ``labels``,
``indices`` and ``seeds``. Images are copied shard by shard in slices of COPY_CHUNK bytes, so memory
stays bounded whatever N is; the output is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import sys
import zipfile

import numpy as np

from ..errors import InputError, TerditError
from .job import JobError, file_sha256, read_manifest, shard_job_id, shard_name
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
    job, job_id = manifests[0]["job"], manifests[0]["job_id"]
    for d, m in zip(dirs[1:], manifests[1:]):
        if m["job_id"] != job_id:
            raise JobError(f"{d} holds a different job than {dirs[0]}; only shards of one job can be merged")
    n_shards = -(-job["n"] // job["shard_size"])
    paths, records, missing = [], [], []
    for k in range(n_shards):
        for d, m in zip(dirs, manifests):
            rec = m["shards"].get(str(k))
            if rec is not None and os.path.isfile(os.path.join(d, shard_name(k))):
                paths.append(os.path.join(d, shard_name(k)))
                records.append(rec)
                break
        else:
            missing.append(k)
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise JobError(f"{len(missing)} of {n_shards} shard(s) are not done ({shown}); run the same "
                       "`terdit-edge sample` command again to finish them (it resumes)")
    # the identity is checked whatever --no-verify says: it costs one small entry per shard
    for p in paths:
        found = shard_job_id(p)
        if found != job_id:
            why = f"belongs to another job (id {found[:12]})" if found else "carries no readable job identity"
            raise JobError(f"{p} {why}, not to this job (id {job_id[:12]}); run the `terdit-edge sample` command "
                           "of this job again: it moves the shard aside and redoes it")
    return {"job": job, "job_id": job_id, "records": records, "manifest": manifests[0]}, paths


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
    current = paths[0]
    try:
        with open(tmp, "wb") as f:
            with NpzWriter(f) as w:
                with w.array_stream("arr_0", (n,) + tuple(shape), np.uint8) as dst:
                    for p, rec in zip(paths, records):
                        current = p
                        with NpzArrayReader(p, "arr_0") as r:
                            if r.dtype != np.uint8 or r.shape[1:] != shape or len(r) != rec["count"]:
                                raise JobError(f"{p}: arr_0 is {r.dtype} {r.shape}; expected uint8 "
                                               f"({rec['count']},) + {shape}")
                            r.copy_data_to(dst, chunk=chunk)
                        if bar is not None:
                            bar.update(rec["count"])
                for key, dtype in (("labels", np.int64), ("indices", np.int64), ("seeds", np.uint64)):
                    parts = []
                    for p in paths:
                        current = p
                        parts.append(read_npz_array(p, key))
                    w.write_array(key, np.concatenate(parts).astype(dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (zipfile.BadZipFile, EOFError, ValueError)) and not isinstance(e, TerditError):
            # a damaged shard (a bad CRC is found only as its bytes are copied, with --no-verify)
            raise JobError(f"{current} is damaged ({type(e).__name__}: {e}); run the `terdit-edge sample` "
                           "command of this job again to redo it") from None
        if isinstance(e, OSError):
            raise JobError(f"merging into {out} failed: {e.strerror or e} ({e.filename or current})") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        print(f"terdit-edge merge: wrote {out}: arr_0 uint8 {(n,) + tuple(shape)} from {len(paths)} shard(s)",
              file=sys.stderr)
    return {"out": out, "n": n, "shape": (n,) + tuple(shape), "shards": len(paths), "job": job}
