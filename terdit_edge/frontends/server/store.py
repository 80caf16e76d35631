"""The server's durable job store: accepted jobs in SQLite (standard library, WAL mode) under a state
directory, so that a restart -- clean, crash or ``kill -9`` -- loses no accepted job.

What is written, and when (each write is one transaction, committed with ``synchronous=FULL``
before the request that caused it is answered):

* a job accepted by ``POST /v1/jobs``: its parameters (classes, seeds, settings), owner (a
  fingerprint of the API key, never the key) and the server identity it was accepted under; an
  edit job also its input picture and mask (PNG, fitted to the model's size) and edit settings;
* its start (status ``running``), a cancel request, and its end: status, error, final step and,
  for a succeeded job, its PNG files;
* the removal of finished jobs past ``--keep-seconds`` / ``--keep-jobs``.

Step progress and previews are not written (they change many times a second). On start the store
gives back every job: queued and interrupted ones (status ``queued``/``running``) run again from
their first step (the images are a pure function of the request, so the bytes are the same);
finished ones are served until their TTL. Synchronous ``/v1/images/generations`` requests are not
stored: their client's connection ends with the process, and the client sees the error.

One server process owns a state directory (an exclusive lock on ``server.lock``); a second one is
refused with a clear error.
"""
from __future__ import annotations

import json
import os
import sqlite3

from ...errors import TerditError

SCHEMA_VERSION = 2  # 2: edit jobs (edit, edit_image, edit_mask); a version-1 store is upgraded in place

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    classes TEXT NOT NULL,
    seeds TEXT NOT NULL,
    settings TEXT NOT NULL,
    server_id TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at_step INTEGER,
    stopped_at_step INTEGER,
    edit TEXT,
    edit_image BLOB,
    edit_mask BLOB
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    k INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, k)
);
"""


class StoreError(TerditError):
    """The state directory cannot be used (locked by another server, unwritable, not a job store)."""


def default_state_dir() -> str:
    from ...hub import cache_dir

    return os.path.join(cache_dir(), "server")


class JobStore:
    """The SQLite file DIR/jobs.sqlite3. Methods are called with the JobManager's lock held (one
    connection, shared by the worker and web threads under that lock)."""

    def __init__(self, state_dir: str):
        self.dir = os.path.abspath(os.fspath(state_dir))
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._lock = open(os.path.join(self.dir, "server.lock"), "a+")
        except OSError as e:
            raise StoreError(f"cannot use the state directory {self.dir!r}: {e.strerror or e}; pass another "
                             "--state-dir, or --ephemeral to keep jobs in memory only") from None
        try:
            import fcntl

            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: no lock
            pass
        except OSError:
            self._lock.close()
            raise StoreError(f"the state directory {self.dir!r} is in use by another `terdit-edge serve`; give "
                             "this one its own --state-dir, or --ephemeral") from None
        self.path = os.path.join(self.dir, "jobs.sqlite3")
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a job is on disk before its 202 is sent, even across a power cut
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] == "1":  # before edit jobs: add their columns (its jobs are generations)
                with self.db:
                    self.db.execute("BEGIN")
                    for col, kind in (("edit", "TEXT"), ("edit_image", "BLOB"), ("edit_mask", "BLOB")):
                        self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {kind}")
                    self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path}: job store schema {row[0]} is not supported (expected "
                                 f"{SCHEMA_VERSION}); move the file away or pass another --state-dir")
        except sqlite3.DatabaseError as e:
            self._lock.close()
            raise StoreError(f"{self.path}: not a usable job store ({e}); move it away or pass another "
                             "--state-dir") from None

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            self._lock.close()

    # -- writes ---------------------------------------------------------------------------------

    def add(self, job, server_id: str) -> None:
        p = job.params
        with self.db:
            self.db.execute("BEGIN")
            e = p.edit
            self.db.execute(
                "INSERT INTO jobs (id, owner, classes, seeds, settings, server_id, created, status, total_steps, "
                "edit, edit_image, edit_mask) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, None if job.owner is None else str(job.owner), json.dumps(list(p.classes)),
                 json.dumps(list(p.seeds)), json.dumps(p.settings.to_json(), sort_keys=True), server_id,
                 job.created, job.status, job.total_steps,
                 None if e is None else json.dumps(e.settings.to_json(), sort_keys=True),
                 None if e is None else e.image, None if e is None or e.mask is None else e.mask))

    def started(self, jobs) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE jobs SET status=?, started=? WHERE id=?",
                                [(j.status, j.started, j.id) for j in jobs])

    def requeued(self, job) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE jobs SET status=?, started=NULL, restarts=? WHERE id=?",
                            (job.status, job.restarts, job.id))

    def cancel_requested(self, job) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE jobs SET cancel_requested_at_step=? WHERE id=?",
                            (job.cancel_requested_at_step, job.id))

    def finished(self, job) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE jobs SET status=?, finished=?, error=?, step=?, stopped_at_step=? WHERE id=?",
                            (job.status, job.finished, job.error, job.step, job.stopped_at_step, job.id))
            if job.images:
                self.db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?)",
                                    [(job.id, k, png) for k, png in enumerate(job.images)])

    def delete(self, ids) -> None:
        if ids:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])

    # -- reads ------------------------------------------------------------------------------------

    def load(self) -> list[dict]:
        """Every stored job as a dict (columns, plus ``images``: list of PNG bytes), oldest first."""
        cur = self.db.execute("SELECT * FROM jobs ORDER BY created, rowid")
        cols = [c[0] for c in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        images: dict[str, list] = {}
        for job_id, _k, png in self.db.execute("SELECT job_id, k, png FROM images ORDER BY job_id, k"):
            images.setdefault(job_id, []).append(bytes(png))
        for r in rows:
            r["images"] = images.get(r["id"], [])
            r["classes"] = json.loads(r["classes"])
            r["seeds"] = json.loads(r["seeds"])
            r["settings"] = json.loads(r["settings"])
            r["edit"] = None if r["edit"] is None else json.loads(r["edit"])
            r["edit_image"] = None if r["edit_image"] is None else bytes(r["edit_image"])
            r["edit_mask"] = None if r["edit_mask"] is None else bytes(r["edit_mask"])
        return rows
