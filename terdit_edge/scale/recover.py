"""Rebuild a sampling job's lost or broken manifest from the shards that carry one job's identity.

Every shard holds the job record (identity, job id, model digest, shard count: ``JobSpec.record``),
so the manifest can be rebuilt without the model or the original command. Only shards whose entries
read back intact (CRCs), whose job id is the chosen job's and whose indices and seeds are those the
job derives for their shard number are recorded; anything else is left in place and listed (the
next `terdit-edge sample` run of the job moves it aside and redoes that shard).
"""
from __future__ import annotations

import collections
import os
import re
import sys
import time

import numpy as np

from .job import (
    MANIFEST,
    JobError,
    _locked,
    file_sha256,
    new_manifest,
    read_manifest,
    sample_labels,
    sample_seeds,
    shard_arrays_problem,
    shard_job_record,
    shard_name,
    write_manifest,
)

SHARD_RE = re.compile(r"^shard-(\d{6})\.npz$")


def _check(path: str, rec: dict, k: int) -> str | None:
    """None when shard file ``path`` holds shard k of the job ``rec`` intact, else why not."""
    job = rec["job"]
    n, size = job["n"], job["shard_size"]
    if not 0 <= k < rec["n_shards"]:
        return f"shard number {k} is outside the job's 0..{rec['n_shards'] - 1}"
    idx = range(k * size, min((k + 1) * size, n))
    rule = job["labels"]["rule"]
    labels = (sample_labels(rule, job["global_seed"], idx, rec["model"]["num_classes"])
              if rule in ("uniform", "balanced") else None)  # other rules: labels stored in the record only
    return shard_arrays_problem(path, idx, labels, sample_seeds(job["global_seed"], idx))


def recover_manifest(out_dir: str, job_id: str | None = None, log=None) -> dict:
    """Write DIR/manifest.json from DIR's shards of one job (``job_id``, a prefix is enough; needed
    only when shards of several jobs are there). A readable manifest is left alone (JobError); a
    broken one is kept as manifest.json.broken-TIME. Returns a summary dict."""
    log = log or (lambda msg: print(f"terdit-edge recover: {msg}", file=sys.stderr))
    if not os.path.isdir(out_dir):
        raise JobError(f"{out_dir} is not a directory")
    with _locked(out_dir):
        path = os.path.join(out_dir, MANIFEST)
        if os.path.exists(path):
            try:
                read_manifest(out_dir)
            except JobError:
                pass
            else:
                raise JobError(f"{path} is readable; nothing to recover (run the job's `terdit-edge sample` "
                               "command to resume, or `terdit-edge merge`)")
        shards = {}
        for name in sorted(os.listdir(out_dir)):
            m = SHARD_RE.match(name)
            if m and os.path.isfile(os.path.join(out_dir, name)):
                shards[int(m.group(1))] = os.path.join(out_dir, name)
        records, no_identity = {}, []
        by_job = collections.defaultdict(list)
        for k, p in shards.items():
            rec = shard_job_record(p)
            if rec is None:
                no_identity.append(k)
                continue
            records[k] = rec
            by_job[rec["job_id"]].append(k)
        if not by_job:
            raise JobError(f"{out_dir}: no shard carries a job identity ({len(shards)} shard file(s)); nothing to "
                           "rebuild a manifest from")
        if job_id is not None:
            chosen = [j for j in by_job if j.startswith(job_id.lower())]
            if len(chosen) != 1:
                raise JobError(f"--job {job_id!r} matches {len(chosen)} of the jobs found: {_describe(by_job, records)}")
            chosen = chosen[0]
        elif len(by_job) > 1:
            raise JobError(f"{out_dir} holds shards of {len(by_job)} jobs: {_describe(by_job, records)}; choose one "
                           "with --job ID")
        else:
            chosen = next(iter(by_job))
        rec0 = records[by_job[chosen][0]]
        manifest = new_manifest(rec0)
        bad = {}
        for k in by_job[chosen]:
            why = _check(shards[k], records[k], k)
            if why is not None:
                bad[k] = why
                continue
            n, size = rec0["job"]["n"], rec0["job"]["shard_size"]
            with np.load(shards[k], allow_pickle=False) as z:
                shape = list(z["arr_0"].shape[1:])
            manifest["shards"][str(k)] = {"file": shard_name(k), "sha256": file_sha256(shards[k]),
                                          "count": min((k + 1) * size, n) - k * size, "first": k * size,
                                          "shape": shape}
        if os.path.exists(path):
            os.replace(path, f"{path}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        write_manifest(out_dir, manifest)
    others = {j: ks for j, ks in by_job.items() if j != chosen}
    log(f"rebuilt {path} for job {chosen[:12]}: {len(manifest['shards'])} of {rec0['n_shards']} shard(s) recorded")
    for k, why in sorted(bad.items()):
        log(f"  {shard_name(k)} not recorded: {why}")
    if others:
        log(f"  left out {sum(map(len, others.values()))} shard(s) of other jobs: {_describe(others, records)}")
    if no_identity:
        log(f"  left out {len(no_identity)} shard(s) without a readable job identity: "
            + ", ".join(shard_name(k) for k in no_identity[:10]) + (" ..." if len(no_identity) > 10 else ""))
    log("the job's `terdit-edge sample` command resumes from it (other files under shard names are moved aside)")
    return {"job_id": chosen, "recorded": sorted(int(k) for k in manifest["shards"]), "bad": bad,
            "other_jobs": {j: sorted(ks) for j, ks in others.items()}, "no_identity": no_identity}


def _describe(by_job: dict, records: dict) -> str:
    parts = []
    for j, ks in sorted(by_job.items(), key=lambda kv: -len(kv[1])):
        job = records[ks[0]]["job"]
        parts.append(f"{j[:12]} ({len(ks)} shard(s); n {job.get('n')}, {job.get('sampler')} {job.get('steps')} "
                     f"steps, backend {job.get('backend')})")
    return "; ".join(parts)
