"""The job store: SQLite in WAL mode under the state dir.

Writes are grouped: the daemon writes rows while it handles a batch of messages and commits
once before it sends any `accepted` of that batch, so every accepted job is on disk without
paying one commit per job. The schema evolves through ordered migrations recorded in
`migrations`.
"""
from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Callable, Iterator

import msgpack

from .jobs import Job
from .protocol import JobState


def m001_jobs(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE jobs (
            task_id      TEXT PRIMARY KEY,
            seq          INTEGER NOT NULL,
            domain       TEXT NOT NULL,
            kind         TEXT NOT NULL,
            priority     TEXT NOT NULL,
            state        TEXT NOT NULL,
            params       BLOB NOT NULL,
            created_at   REAL NOT NULL,
            started_at   REAL,
            finished_at  REAL,
            deadline_at  REAL,          -- wall-clock deadline, NULL = none
            attempts     INTEGER NOT NULL DEFAULT 0,
            interrupted  INTEGER NOT NULL DEFAULT 0,
            detached     INTEGER NOT NULL DEFAULT 0,
            result       BLOB,
            error        BLOB
        ) WITHOUT ROWID""")
    # no secondary indexes: they are read only at start-up and by the minutely TTL sweep,
    # but would cost pages on every commit of the hot path


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_jobs]


def _pack(v: Any) -> bytes | None:
    return None if v is None else msgpack.packb(v, use_bin_type=True)


def _unpack(v: bytes | None) -> Any:
    return None if v is None else msgpack.unpackb(v, raw=False)


class JobStore:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        # autocommit off: the daemon decides when a batch of writes is committed
        self.db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        # the daemon is the store's only user (its lock file guarantees one daemon): exclusive
        # locking keeps the WAL index in process memory and skips a lock dance per commit
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes
        self.db.execute("PRAGMA busy_timeout=5000")
        # checkpoints fsync; let the WAL grow (16 MB) and checkpoint from the daemon's idle
        # sweep instead of in the middle of a burst of jobs
        self.db.execute("PRAGMA wal_autocheckpoint=4000")
        self.migrate()
        self.dirty = False
        self.pending: dict[str, Job] = {}
        self.deadlines: dict[str, float | None] = {}

    def migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS migrations "
                        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL)")
        done = {r[0] for r in self.db.execute("SELECT version FROM migrations")}
        for version, migration in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            migration(self.db)
            self.db.execute("INSERT INTO migrations VALUES (?, ?, ?)",
                            (version, migration.__name__, time.time()))
        self.db.commit()

    def versions(self) -> list[tuple[int, str]]:
        return list(self.db.execute("SELECT version, name FROM migrations ORDER BY version"))

    # --- writes (made by `commit`) ------------------------------------------------------------
    # A job changed several times in one loop iteration (accepted, then dispatched) is written
    # once, as it stands at the commit: one upsert per job per iteration.
    def insert(self, job: Job, deadline_at: float | None) -> None:
        self.deadlines[job.task_id] = deadline_at
        self.pending[job.task_id] = job

    def update(self, job: Job) -> None:
        self.pending[job.task_id] = job

    def commit(self) -> None:
        if not self.pending and not self.dirty:
            return
        if self.pending:
            rows = [(j.task_id, j.seq, j.domain, j.kind, j.priority, j.state, _pack(j.params),
                     j.created_at, j.started_at, j.finished_at,
                     self.deadlines.pop(j.task_id, None), j.attempts, j.interrupted,
                     int(j.detached), _pack(j.result), _pack(j.error))
                    for j in self.pending.values()]
            self.db.executemany(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(task_id) DO UPDATE SET state=excluded.state, "
                "started_at=excluded.started_at, finished_at=excluded.finished_at, "
                "attempts=excluded.attempts, interrupted=excluded.interrupted, "
                "result=excluded.result, error=excluded.error", rows)
            self.pending.clear()
        self.db.commit()
        self.dirty = False

    # --- reads -------------------------------------------------------------------------------
    def _job(self, row: tuple) -> tuple[Job, float | None]:
        (task_id, seq, domain, kind, priority, state, params, created_at, started_at,
         finished_at, deadline_at, attempts, interrupted, detached, result, error) = row
        job = Job(task_id=task_id, domain=domain, kind=kind, params=_unpack(params),
                  priority=priority, created_at=created_at, state=state,
                  started_at=started_at, finished_at=finished_at, attempts=attempts,
                  result=_unpack(result), error=_unpack(error), seq=seq,
                  detached=bool(detached))
        job.interrupted = interrupted
        return job, deadline_at

    def unfinished(self) -> Iterator[tuple[Job, float | None]]:
        """Queued and running jobs, in their original order."""
        for row in self.db.execute("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY seq",
                                   (JobState.QUEUED, JobState.RUNNING)):
            yield self._job(row)

    def recent_finished(self, limit: int) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs WHERE finished_at IS NOT NULL "
                               "ORDER BY seq DESC LIMIT ?", (limit,))
        return [self._job(r)[0] for r in rows][::-1]

    def get(self, task_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE task_id=?", (task_id,)).fetchone()
        return self._job(row)[0] if row else None

    def max_seq(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]

    def expired(self, before: float) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs WHERE finished_at IS NOT NULL AND "
                               "finished_at < ?", (before,))
        return [self._job(r)[0] for r in rows]

    def delete(self, task_ids: list[str]) -> None:
        self.commit()
        self.db.executemany("DELETE FROM jobs WHERE task_id=?", [(t,) for t in task_ids])
        self.dirty = True

    def checkpoint(self) -> None:
        self.commit()
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self.commit()
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()
