"""Sampling jobs: N samples of a model in fixed shards, written atomically, resumable, engine-independent.

Sample i of a job (i = 0 .. N-1) is a pure function of (model file, global seed, i, label rule,
sampler settings):

* its seed: the first 8 bytes, big-endian, of SHA-256 of the ASCII text
  ``"terdit-edge/sample/v1/seed/{global_seed}/{i}"``, with the top bit cleared (0 .. 2**63-1);
* its class label, by the ``--labels`` rule:
  ``uniform``  -- the same construction with ``.../label/{global_seed}/{i}``, modulo the number of
  classes (independent uniform draws, like DiT's ``sample_ddp.py``);
  ``balanced`` -- ``i mod num_classes`` (every class N / num_classes times when it divides N);
  ``FILE.npy`` -- entry i of a 1-D integer array of length N;
* its image: ``Pipeline(labels=[label_i], settings.replace(seeds=[seed_i]))`` converted with ``to_uint8`` and, for
  one-channel models, repeated to three equal channels (R = G = B), shape (H, W, 3).

Indices are cut into shards of ``shard_size`` consecutive samples (shard k holds
``k*shard_size .. min((k+1)*shard_size, N) - 1``). Shard k is the file ``shard-{k:06d}.npz`` with the
arrays ``arr_0`` (uint8 (n, H, W, 3)), ``labels`` (int64), ``indices`` (int64), ``seeds`` (uint64) and
the job's identity: ``job_id`` (the 64 ASCII hex digits of the job id, as uint8) and ``job`` (the UTF-8
JSON of the job record: identity, job id, model; uint8). It is written to a temporary name, fsynced
and renamed, so a shard file is complete or absent. ``manifest.json`` holds the job's identity, the
model file's SHA-256 and each finished shard's SHA-256; it is updated under a lock, so several
processes (``--shard K/N`` of a batch array) can share one directory.

The job id is the SHA-256 of the canonical JSON (sorted keys, no spaces) of ``JobSpec.identity()``:
the model file's content digest, every parameter that changes a byte (n, global seed, label rule,
every generation setting but the seeds, activations included, the shard size), the compute backend
actually used, the package version, the seed derivation and the RNG contract version. Resume and
merge use a shard only when its ``job_id`` is the job's, whether the manifest lists it or not, so a
shard of another job (other steps, another model, another backend...) is never adopted; a lost
manifest is rebuilt from the shards that carry one job id (``terdit-edge recover DIR``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .._version import __version__
from ..diffusion import RNG_CONTRACT_VERSION
from ..errors import InputError, TerditError
from ..settings import GenerationSettings

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "terdit-edge-sample-job"
MANIFEST_VERSION = 2  # 2: the job id in the manifest and in every shard (issue 25)
DERIVATION = "v1"
LABEL_RULES = ("uniform", "balanced")


class JobError(TerditError):
    """A sampling job cannot run or resume (another job in the directory, workers dying, ...)."""


# ----------------------------------------------------------------------------------------------
# Derivation of labels and seeds
# ----------------------------------------------------------------------------------------------

def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:8], "big")


def sample_seed(global_seed: int, i: int) -> int:
    """The seed of sample i (see the module docstring)."""
    return _hash64(f"terdit-edge/sample/{DERIVATION}/seed/{int(global_seed)}/{int(i)}") & ((1 << 63) - 1)


def sample_seeds(global_seed: int, indices) -> np.ndarray:
    return np.array([sample_seed(global_seed, i) for i in indices], dtype=np.uint64)


def sample_labels(rule: str, global_seed: int, indices, num_classes: int, label_array=None) -> np.ndarray:
    """Class labels of the given sample indices under ``rule`` ("uniform", "balanced" or "file")."""
    idx = np.asarray(list(indices), dtype=np.int64)
    if rule == "uniform":
        return np.array([_hash64(f"terdit-edge/sample/{DERIVATION}/label/{int(global_seed)}/{int(i)}") % num_classes
                         for i in idx], dtype=np.int64)
    if rule == "balanced":
        return idx % num_classes
    if rule == "file":
        return np.asarray(label_array, dtype=np.int64)[idx]
    raise InputError(f"unknown label rule {rule!r}")


def load_label_file(path, n: int, num_classes: int) -> np.ndarray:
    """A labels .npy file: 1-D integers, length n, each in 0..num_classes-1 (no pickle)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"labels file {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise InputError(f"labels file {path!r} is not a readable .npy array without pickles: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InputError(f"labels file {path!r} must hold a 1-D integer array, got "
                         f"{getattr(arr, 'dtype', type(arr))} with shape {getattr(arr, 'shape', '?')}")
    if len(arr) != n:
        raise InputError(f"labels file {path!r} has {len(arr)} labels but the job has -n {n} samples")
    if len(arr) and (arr.min() < 0 or arr.max() >= num_classes):
        raise InputError(f"labels file {path!r}: labels must be in 0..{num_classes - 1}, found "
                         f"{int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int64)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def to_rgb_uint8(images01: np.ndarray) -> np.ndarray:
    """float (B, H, W, C) in [0, 1] -> uint8 (B, H, W, 3): ``to_uint8``, one channel repeated 3 times."""
    from ..pipeline import to_uint8

    u8 = to_uint8(images01)
    if u8.shape[-1] == 1:
        u8 = np.repeat(u8, 3, axis=-1)
    elif u8.shape[-1] != 3:
        raise InputError(f"cannot store images with {u8.shape[-1]} channels as RGB")
    return np.ascontiguousarray(u8)


# ----------------------------------------------------------------------------------------------
# Job description
# ----------------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    """Everything that determines the job's bytes (``identity()``), plus how to run it."""

    model_path: str
    n: int
    global_seed: int = 0
    labels: str = "uniform"          # "uniform" | "balanced" | path of a .npy file
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # its seeds are not used
    shard_size: int = 1000
    backend: str = "auto"            # resolved by prepare(): the identity names the backend that runs
    # not part of the identity: they do not change a byte
    batch_size: int = 8
    verify: bool = True
    # filled by prepare()
    model_sha256: str = ""
    num_classes: int = 0
    label_rule: str = ""
    label_array: np.ndarray | None = field(default=None, repr=False)
    labels_sha256: str | None = None

    def prepare(self) -> "JobSpec":
        from ..format import read_tdit
        from ..pipeline import default_model_path

        if self.model_path is None:
            self.model_path = default_model_path()
        self.model_path = os.path.abspath(os.fspath(self.model_path))
        def is_int(v, minimum):
            return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= minimum

        if not is_int(self.n, 1):
            raise InputError(f"-n must be a positive number of samples, got {self.n!r}")
        if not is_int(self.shard_size, 1):
            raise InputError(f"shard size must be a positive integer, got {self.shard_size!r}")
        if not is_int(self.batch_size, 1):
            raise InputError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not is_int(self.global_seed, 0):
            raise InputError(f"global seed must be a non-negative integer, got {self.global_seed!r}")
        if not isinstance(self.settings, GenerationSettings):
            raise InputError(f"settings must be a GenerationSettings, got {type(self.settings).__name__}")
        if self.settings.seed is not None or self.settings.seeds is not None:
            raise InputError("a sampling job derives its seeds from the global seed: give settings without seeds")
        if not os.path.exists(self.model_path):
            raise InputError(f"model file {self.model_path!r} does not exist")
        tf = read_tdit(self.model_path, verify=False)
        if tf.config is None:
            raise InputError(f"{self.model_path}: holds only a VAE; pass a model file")
        self.num_classes = tf.config.num_classes
        del tf
        # "auto" picks by what is installed, which may differ between the run and its resume (or
        # between nodes): the job records, and its workers load, the backend it resolved to here
        self.backend = resolve_backend(self.backend)
        self.model_sha256 = file_sha256(self.model_path)
        if self.labels in LABEL_RULES:
            self.label_rule, self.labels_sha256 = self.labels, None
        else:
            self.label_rule = "file"
            self.label_array = load_label_file(self.labels, self.n, self.num_classes)
            self.labels_sha256 = file_sha256(self.labels)
        return self

    def identity(self) -> dict:
        """Everything that fixes the job's bytes (see the module docstring); recorded in the
        manifest and, through its hash :meth:`job_id`, in every shard."""
        labels = {"rule": self.label_rule}
        if self.label_rule == "file":
            labels["sha256"] = self.labels_sha256
        return {"model_sha256": self.model_sha256, "n": int(self.n), "global_seed": int(self.global_seed),
                "labels": labels, **self.settings.identity(), "shard_size": int(self.shard_size),
                "backend": self.backend, "terdit_edge_version": __version__, "derivation": DERIVATION,
                "rng_contract": RNG_CONTRACT_VERSION}

    def job_id(self) -> str:
        return identity_hash(self.identity())

    def record(self) -> dict:
        """What a shard carries about its job: enough to rebuild the manifest without the model."""
        return {"job": self.identity(), "job_id": self.job_id(), "n_shards": self.n_shards,
                "model": {"file": os.path.basename(self.model_path), "sha256": self.model_sha256,
                          "num_classes": self.num_classes}}

    @property
    def n_shards(self) -> int:
        return -(-int(self.n) // int(self.shard_size))

    def shard_indices(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))

    def labels_of(self, indices) -> np.ndarray:
        return sample_labels(self.label_rule, self.global_seed, indices, self.num_classes, self.label_array)

    def seeds_of(self, indices) -> np.ndarray:
        return sample_seeds(self.global_seed, indices)

    def worker_config(self, threads: int | None) -> dict:
        """What a worker needs to load the model and sample (plain data: picklable for any engine)."""
        return {"model_path": self.model_path, "model_sha256": self.model_sha256, "backend": self.backend,
                "threads": threads, "settings": self.settings.to_json(), "batch_size": int(self.batch_size),
                "verify": bool(self.verify)}


def identity_hash(identity: dict) -> str:
    """The job id: SHA-256 of the identity's canonical JSON."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def resolve_backend(name: str) -> str:
    """The concrete backend ``name`` ("auto" included) loads here (BackendError if none)."""
    from ..kernels import get_backend

    return get_backend(name, threads=1).name


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.npz"


def parse_shard_selector(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N): this process does the shards k with k % N == K. Also the argparse type of
    ``--shard`` (an InputError becomes argparse's usage error, exit status 2)."""
    if text is None:
        return 0, 1
    try:
        k_s, n_s = text.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise InputError(f"--shard must be K/N with integers 0 <= K < N, got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise InputError(f"--shard must be K/N with 0 <= K < N, got {text!r}")
    return k, n


# ----------------------------------------------------------------------------------------------
# Manifest and shard files
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(out_dir: str):
    """An exclusive lock on DIR/.manifest.lock (fcntl; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(os.path.join(out_dir, ".manifest.lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: str, data: bytes):
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise JobError(f"{path}: unreadable manifest ({e}); rebuild it from the shards with `terdit-edge recover "
                       f"{out_dir}` (it keeps only shards that carry one job's identity)") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("job"), dict):
        raise JobError(f"{path}: not a terdit-edge sampling manifest; rebuild it from the shards with "
                       f"`terdit-edge recover {out_dir}`")
    if m.get("version") == 1:
        raise JobError(f"{path}: a job started by terdit-edge {m.get('terdit_edge_version', '< 0.2')}, whose shards "
                       "carry no job identity and cannot be checked against this job: finish or merge it with "
                       "that version, or use another --out directory")
    if m.get("version") != MANIFEST_VERSION or not isinstance(m.get("job_id"), str):
        raise JobError(f"{path}: manifest version {m.get('version')} is not supported (expected {MANIFEST_VERSION})")
    m.setdefault("shards", {})
    return m


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} in the directory, {new.get(k)!r} now" for k in keys
                     if old.get(k) != new.get(k))


def open_job_dir(out_dir: str, spec: JobSpec, extra: dict | None = None) -> dict:
    """Create DIR and its manifest, or check that DIR holds the same job. Returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    job = spec.identity()
    with _locked(out_dir):
        for name in os.listdir(out_dir):  # manifest writes happen under this lock: leftovers are stale
            if name.startswith(MANIFEST + ".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out_dir, name))
        m = read_manifest(out_dir)
        if m is None:
            m = new_manifest(spec.record())
            if spec.label_rule == "file":
                m["labels_file"] = os.path.abspath(spec.labels)
            if extra:
                m.update(extra)
            _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(m, indent=1, sort_keys=True).encode())
        elif m["job"] != job:
            raise JobError(f"{out_dir} holds a different sampling job ({_describe_difference(m['job'], job)}); "
                           "use another --out directory, or the same parameters to resume")
    return m


def new_manifest(record: dict) -> dict:
    """An empty manifest for the job ``record`` (:meth:`JobSpec.record`, or a shard's)."""
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "job": record["job"], "job_id": record["job_id"],
            "model": record["model"], "n_shards": record["n_shards"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "terdit_edge_version": __version__,
            "shards": {}}


def write_manifest(out_dir: str, m: dict):
    """Write DIR/manifest.json atomically (call with the lock held)."""
    _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(m, indent=1, sort_keys=True).encode())


def record_shard(out_dir: str, k: int, info: dict):
    with _locked(out_dir):
        m = read_manifest(out_dir)
        if m is None:
            raise JobError(f"{out_dir}: {MANIFEST} disappeared while the job was running")
        m["shards"][str(k)] = info
        _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(m, indent=1, sort_keys=True).encode())


def forget_shard(out_dir: str, k: int):
    with _locked(out_dir):
        m = read_manifest(out_dir)
        if m is not None and str(k) in m["shards"]:
            del m["shards"][str(k)]
            _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(m, indent=1, sort_keys=True).encode())


def _text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def write_shard(out_dir: str, k: int, images: np.ndarray, labels, indices, seeds, record: dict) -> dict:
    """Write shard k of the job ``record`` (:meth:`JobSpec.record`) atomically; returns its manifest
    record (file, sha256, count, first index). Nothing is left behind when it fails."""
    path = os.path.join(out_dir, shard_name(k))
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    from .npzio import NpzWriter

    try:
        with open(tmp, "wb") as f:
            with NpzWriter(f) as w:
                w.write_array("arr_0", np.ascontiguousarray(images, dtype=np.uint8))
                w.write_array("labels", np.asarray(labels, dtype=np.int64))
                w.write_array("indices", np.asarray(indices, dtype=np.int64))
                w.write_array("seeds", np.asarray(seeds, dtype=np.uint64))
                w.write_array("job_id", _text_array(record["job_id"]))
                w.write_array("job", _text_array(json.dumps(record, sort_keys=True, separators=(",", ":"))))
            f.flush()
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise JobError(f"cannot write {path}: {e.strerror or e}") from None
    with contextlib.suppress(OSError):  # make the rename durable
        dfd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return {"file": shard_name(k), "sha256": digest, "count": int(len(indices)), "first": int(indices[0]),
            "shape": list(images.shape[1:])}


def shard_job_id(path: str) -> str | None:
    """The job id a shard file carries; None when it carries none or cannot be read."""
    from .npzio import read_npz_array

    try:
        raw = read_npz_array(path, "job_id")
    except Exception:  # noqa: BLE001 - any unreadable file carries no identity (zipfile raises many kinds)
        return None
    if raw.dtype != np.uint8 or raw.ndim != 1 or len(raw) != 64:
        return None
    text = raw.tobytes().decode("ascii", "replace")
    return text if all(c in "0123456789abcdef" for c in text) else None


def shard_job_record(path: str) -> dict | None:
    """The job record a shard carries (its ``job`` entry), None when absent or unreadable."""
    from .npzio import read_npz_array

    try:
        rec = json.loads(read_npz_array(path, "job").tobytes().decode("utf-8"))
    except Exception:  # noqa: BLE001 - as shard_job_id
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("job"), dict) and isinstance(rec.get("model"), dict) \
        and isinstance(rec.get("n_shards"), int) and rec.get("job_id") == identity_hash(rec["job"])
    return rec if ok else None


def _not_a_file(path: str) -> JobError:
    what = "a directory" if os.path.isdir(path) else "not a regular file"
    return JobError(f"{path} is {what}, but the job writes a shard file under that name; move it away and run "
                    "the command again")


def shard_arrays_problem(path: str, idx: range, labels, seeds) -> str | None:
    """None if the shard file at ``path`` is complete and holds the samples ``idx`` with these labels
    (None: not checked) and seeds, else why not. Reading the entries checks their CRCs, so flipped
    bytes are found. Shared by resume/merge and `recover`."""
    from .npzio import read_npz_array

    try:
        arrs = {key: read_npz_array(path, key) for key in ("arr_0", "labels", "indices", "seeds")}
    except (TerditError, OSError, ValueError, EOFError) as e:
        return f"unreadable ({e})"
    except Exception as e:  # zipfile.BadZipFile for a bad CRC, struct errors...
        return f"unreadable ({type(e).__name__}: {e})"
    img = arrs["arr_0"]
    if img.dtype != np.uint8 or img.ndim != 4 or img.shape[0] != len(idx) or img.shape[3] != 3:
        return f"arr_0 has dtype {img.dtype} and shape {img.shape}; expected uint8 ({len(idx)}, H, W, 3)"
    if not np.array_equal(arrs["indices"], np.arange(idx.start, idx.stop)):
        return "wrong indices"
    if labels is not None and not np.array_equal(arrs["labels"], labels):
        return "wrong labels"
    if not np.array_equal(arrs["seeds"], seeds):
        return "wrong seeds"
    return None


def check_shard_content(path: str, spec: JobSpec, k: int) -> str | None:
    """None if the shard file at ``path`` is complete and holds shard k of this job, else why not."""
    idx = spec.shard_indices(k)
    return shard_arrays_problem(path, idx, spec.labels_of(idx), spec.seeds_of(idx))


def shard_status(out_dir: str, manifest: dict, spec: JobSpec, k: int) -> tuple[str, str]:
    """('valid' | 'missing' | 'corrupt' | 'foreign', detail). A shard is used only when it carries
    this job's id; then a recorded shard is valid when its file's SHA-256 matches the record, and an
    unrecorded one (a run stopped between rename and record, or a lost manifest) is checked by
    content and then recorded. 'foreign': a shard of another job (or of none) under this name."""
    path = os.path.join(out_dir, shard_name(k))
    rec = manifest["shards"].get(str(k))
    if not os.path.lexists(path):
        return ("missing", "recorded in the manifest but the file is gone") if rec else ("missing", "")
    if not os.path.isfile(path):
        raise _not_a_file(path)
    found = shard_job_id(path)
    if found != spec.job_id():
        # never deleted: what cannot be shown to be this job's may be someone's work (it is moved aside)
        return "foreign", (f"it belongs to another job (id {found[:12]}; this job is {spec.job_id()[:12]})"
                           if found else "it carries no readable job identity (another job's, or damaged)")
    if rec is not None:
        digest = file_sha256(path)
        if digest == rec.get("sha256") and rec.get("count") == len(spec.shard_indices(k)):
            return "valid", ""
        return "corrupt", "its SHA-256 does not match the manifest"
    why = check_shard_content(path, spec, k)
    if why is not None:
        return "corrupt", why
    with np.load(path, allow_pickle=False) as z:
        shape = list(z["arr_0"].shape[1:])
    record_shard(out_dir, k, {"file": shard_name(k), "sha256": file_sha256(path), "count": len(spec.shard_indices(k)),
                              "first": spec.shard_indices(k).start, "shape": shape})
    return "valid", "recovered"


def remove_stale_temp_files(out_dir: str, shards):
    """Temporary files this host left for the given shards (a killed run); other hosts' are kept."""
    host = socket.gethostname()
    wanted = {shard_name(k) for k in shards}
    for name in os.listdir(out_dir):
        if name.endswith(".tmp") and f".{host}." in name:
            base = name.split(f".{host}.")[0]
            if base in wanted:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------------------------
# Running a job
# ----------------------------------------------------------------------------------------------

@dataclass
class Unit:
    """One piece of work sent to a worker: consecutive samples of one shard (at most a batch)."""

    uid: int
    shard: int
    offset: int              # position of the first sample in the shard
    labels: list
    seeds: list


@dataclass
class JobResult:
    out_dir: str
    n: int
    shards_total: int
    shards_selected: list
    shards_skipped: int = 0
    shards_redone: int = 0
    shards_written: int = 0
    samples_computed: int = 0
    seconds: float = 0.0
    engine: str = ""
    retries: int = 0
    complete: bool = False   # every shard of the job (not only the selected ones) is present

    @property
    def samples_per_second(self) -> float:
        return self.samples_computed / self.seconds if self.seconds > 0 else 0.0


class _Reporter:
    """The job's messages on stderr; while the progress bar is shown they go above it (tqdm.write),
    never onto the bar's line. Engines report through it too (``engine.log``)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, msg: str):
        if self.quiet:
            return
        line = f"terdit-edge sample: {msg}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def _log(msg: str, quiet: bool):
    _Reporter(quiet)(msg)


def move_aside(path: str, tag: str) -> str:
    """Rename ``path`` to a free ``path.rejected-TAG[-N]`` (nothing is deleted); returns the new name."""
    dst = f"{path}.rejected-{tag}"
    n = 1
    while os.path.lexists(dst):
        n += 1
        dst = f"{path}.rejected-{tag}-{n}"
    os.replace(path, dst)
    return dst


def run_job(spec: JobSpec, out_dir: str, engine, shard: tuple[int, int] = (0, 1), progress: bool = True,
            png: bool = False, quiet: bool = False, on_unit=None) -> JobResult:
    """Run (or resume) the job ``spec`` in ``out_dir`` with ``engine`` (see engines.py).

    Only the shards k with ``k % shard[1] == shard[0]`` are done by this call. ``on_unit(unit, info)``
    is called in this process after each finished unit (for tests and monitoring).
    """
    t0 = time.time()
    if spec.model_sha256 == "":
        spec.prepare()
    out_dir = os.path.abspath(out_dir)
    manifest = open_job_dir(out_dir, spec)
    sel_k, sel_n = shard
    selected = [k for k in range(spec.n_shards) if k % sel_n == sel_k]
    res = JobResult(out_dir=out_dir, n=spec.n, shards_total=spec.n_shards, shards_selected=selected,
                    engine=getattr(engine, "name", type(engine).__name__))
    log = _Reporter(quiet)
    if hasattr(engine, "log"):
        engine.log = log
    if not selected:
        log(f"--shard {sel_k}/{sel_n} selects no shard: the job has {spec.n_shards} shard(s) (0..{spec.n_shards - 1}) "
            f"and this part does those with k % {sel_n} == {sel_k}; nothing to do (use at most {spec.n_shards} "
            "parts, or a smaller --shard-size for more shards)")
    remove_stale_temp_files(out_dir, selected)
    todo = []
    for k in selected:
        status, why = shard_status(out_dir, manifest, spec, k)
        if status == "valid":
            res.shards_skipped += 1
            if png:
                _write_pngs(out_dir, spec, k, only_missing=True)
        else:
            path = os.path.join(out_dir, shard_name(k))
            if status == "corrupt":
                log(f"shard {k} ({shard_name(k)}): {why}; redoing it")
                res.shards_redone += 1
                with contextlib.suppress(OSError):
                    os.remove(path)
            elif status == "foreign":
                found = shard_job_id(path)
                moved = move_aside(path, found[:12] if found else "unknown")
                log(f"shard {k} ({shard_name(k)}): {why}; not used: moved to {os.path.basename(moved)}, redoing it")
                res.shards_redone += 1
            if status != "missing" or str(k) in manifest["shards"]:
                forget_shard(out_dir, k)
            todo.append(k)
    n_todo = sum(len(spec.shard_indices(k)) for k in todo)
    n_sel = sum(len(spec.shard_indices(k)) for k in selected)
    if res.shards_skipped:
        log(f"resuming: {res.shards_skipped} of {len(selected)} shard(s) already done")
    units, uid = [], 0
    pending = {}
    for k in todo:
        idx = spec.shard_indices(k)
        labels, seeds = spec.labels_of(idx), spec.seeds_of(idx)
        pending[k] = {"images": None, "left": len(idx), "labels": labels, "seeds": seeds, "indices": idx}
        for off in range(0, len(idx), spec.batch_size):
            units.append(Unit(uid, k, off, [int(v) for v in labels[off:off + spec.batch_size]],
                              [int(v) for v in seeds[off:off + spec.batch_size]]))
            uid += 1
    bar = None
    if progress and units:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_sel, initial=n_sel - n_todo, unit="img", desc="sampling", dynamic_ncols=True,
                   smoothing=0.05)
        log.bar = bar
    t_run = time.time()
    record = spec.record()
    try:
        if units:
            for unit, images, info in engine.imap(spec, units):
                p = pending[unit.shard]
                if p["images"] is None:
                    p["images"] = np.empty((len(p["indices"]),) + images.shape[1:], dtype=np.uint8)
                p["images"][unit.offset:unit.offset + len(images)] = images
                p["left"] -= len(images)
                res.samples_computed += len(images)
                if bar is not None:
                    bar.update(len(images))
                if p["left"] == 0:
                    idx = p["indices"]
                    rec = write_shard(out_dir, unit.shard, p["images"], p["labels"], np.arange(idx.start, idx.stop),
                                      p["seeds"], record)
                    record_shard(out_dir, unit.shard, rec)
                    res.shards_written += 1
                    del pending[unit.shard]
                    if png:
                        _write_pngs(out_dir, spec, unit.shard, only_missing=False)
                if on_unit is not None:
                    on_unit(unit, info)
    finally:
        if bar is not None:
            bar.close()
            log.bar = None
    res.retries = getattr(engine, "retries", 0)
    res.seconds = time.time() - t_run
    m = read_manifest(out_dir)
    res.complete = all(str(k) in m["shards"] for k in range(spec.n_shards))
    if not quiet:
        rate = f", {res.samples_per_second:.2f} samples/s" if res.samples_computed else ""
        extra = "" if res.complete else " (other shards of the job are not done yet)"
        log(f"{res.shards_written} shard(s) written, {res.shards_skipped} already done, {res.samples_computed} "
            f"samples in {time.time() - t0:.1f} s{rate}; {out_dir}{extra}")
    return res


def _write_pngs(out_dir: str, spec: JobSpec, k: int, only_missing: bool):
    from PIL import Image

    from ..pngmeta import generation_metadata, png_bytes

    png_dir = os.path.join(out_dir, "png")
    os.makedirs(png_dir, exist_ok=True)
    idx = spec.shard_indices(k)
    names = [os.path.join(png_dir, f"{i:06d}.png") for i in idx]
    if only_missing and all(os.path.exists(n) for n in names):
        return
    with np.load(os.path.join(out_dir, shard_name(k)), allow_pickle=False) as z:
        images, labels, seeds = z["arr_0"], z["labels"], z["seeds"]
    model = os.path.basename(spec.model_path)
    for j, name in enumerate(names):
        if only_missing and os.path.exists(name):
            continue
        img = images[j]
        im = Image.fromarray(img[:, :, 0] if np.array_equal(img[:, :, 0], img[:, :, 2]) and
                             np.array_equal(img[:, :, 0], img[:, :, 1]) else img)
        meta = generation_metadata(model, [int(labels[j])], [int(seeds[j])], spec.settings, indices=[idx[j]])
        tmp = name + ".tmp"
        with open(tmp, "wb") as f:
            f.write(png_bytes(im, meta))
        os.replace(tmp, name)
