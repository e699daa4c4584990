"""The job store: an append-only journal in front of SQLite (WAL) under the state dir.

On the daemon's hot path a loop iteration's changed jobs are appended to `jobs.db.journal`
with one write() — in the kernel's page cache, so they survive the daemon being killed — and
only then do clients hear about them. A writer thread applies the same rows to SQLite in
groups, fsyncs the journal at most once a second, and truncates it once everything in it is
in the database. At start-up whatever the journal still holds is replayed into SQLite first.

SQLite is where jobs are queried (restart recovery, `get` of old jobs, the TTL sweep). The
schema evolves through ordered migrations recorded in `migrations`.

The results TTL sweep runs on the writer thread too, in order with the upserts, in chunks of
`SWEEP_CHUNK` rows through an index on the finish time; it deletes the result files there as
well, so the daemon's loop never waits on a sweep. What it removed comes back on `swept`.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import msgpack

from .jobs import Job
from .protocol import JobState, pack

log = logging.getLogger("resisod")
DISK_FULL_RETRY_S = 1.0

JOURNAL_TRUNCATE_BYTES = 1 << 20
FSYNC_EVERY_S = 1.0
# the writer applies what accumulated at this pace: waking it for every loop iteration
# would make it fight the daemon's thread for the interpreter on every job
APPLY_EVERY_S = 0.1
UPSERT = ("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
          "ON CONFLICT(task_id) DO UPDATE SET state=excluded.state, "
          "started_at=excluded.started_at, finished_at=excluded.finished_at, "
          "attempts=excluded.attempts, interrupted=excluded.interrupted, "
          "result=excluded.result, error=excluded.error")
FRAME = struct.Struct("<I")
SWEEP_CHUNK = 2000   # expired rows per writer pass: a pass costs tens of ms, off the loop


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
    # no secondary index on the hot columns: each would cost pages on every write


def m002_finish_index(db: sqlite3.Connection) -> None:
    # the TTL sweep takes the oldest finished jobs a chunk at a time; only finished rows are
    # in the index, so queued and running jobs cost it nothing
    db.execute("CREATE INDEX jobs_by_finish ON jobs(finished_at) WHERE finished_at IS NOT NULL")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_jobs, m002_finish_index]


@dataclass(frozen=True)
class Sweep:
    """A request to the writer: delete jobs finished before `before` (wall time), and the
    result files they name under `files_under`."""
    before: float
    files_under: str


def _pack(v: Any) -> bytes | None:
    return None if v is None else pack(v)


def _unpack(v: bytes | None) -> Any:
    return None if v is None else msgpack.unpackb(v, raw=False)


def read_journal(path: str) -> list[list]:
    """The row batches in a journal; a torn last frame (a crash mid-write) is ignored."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    batches, pos = [], 0
    while pos + FRAME.size <= len(data):
        (n,) = FRAME.unpack_from(data, pos)
        if pos + FRAME.size + n > len(data):
            break
        try:
            batches.append(msgpack.unpackb(data[pos + FRAME.size:pos + FRAME.size + n],
                                           raw=False))
        except Exception:
            break
        pos += FRAME.size + n
    return batches


class JobStore:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        # the daemon is the store's only user (its socket lock guarantees one daemon):
        # exclusive locking keeps the WAL index in process memory
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint=4000")
        self.db_lock = threading.Lock()     # the connection is shared with the writer thread
        self.migrate()
        self.journal_path = path + ".journal"
        self.replay()
        self.jfd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # the journal's length, kept here (under journal_lock) rather than asked of the
        # kernel before every append: a torn append is cut back to it
        self.jend = os.fstat(self.jfd).st_size
        self.journal_lock = threading.Lock()  # append vs truncate
        self.appended = self.applied = 0
        self.applied_cv = threading.Condition()
        self.flushing = threading.Event()   # set while someone waits for the writer
        self.pending: dict[str, Job] = {}
        self.packed_params: dict[str, bytes] = {}  # unfinished jobs' params, as written
        self.full: OSError | None = None    # the last journal write failed (a full disk)
        self.closing = False
        self.deadlines: dict[str, float | None] = {}
        self.batches: queue.SimpleQueue = queue.SimpleQueue()
        # (task ids deleted, whether more expired rows remain) per sweep, from the writer
        self.swept: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._apply_loop, name="store-writer",
                                       daemon=True)
        self.writer.start()

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

    def replay(self) -> None:
        batches = read_journal(self.journal_path)
        if batches:
            for rows in batches:
                self.db.executemany(UPSERT, rows)
            self.db.commit()
        if os.path.exists(self.journal_path):
            os.truncate(self.journal_path, 0)

    # --- writes -------------------------------------------------------------------------------
    # A job changed several times in one loop iteration (accepted, then dispatched) is written
    # once, as it stands at the commit.
    def insert(self, job: Job, deadline_at: float | None) -> None:
        self.deadlines[job.task_id] = deadline_at
        self.pending[job.task_id] = job

    def update(self, job: Job) -> None:
        self.pending[job.task_id] = job

    def commit(self) -> None:
        """Make the iteration's changes durable (one journal write) before clients hear."""
        if not self.pending:
            return
        packed, rows = self.packed_params, []
        for j in self.pending.values():
            # a job's params never change once it is queued: packed once, not per change
            params = packed.get(j.task_id)
            if params is None:
                params = packed[j.task_id] = pack(j.params)
            rows.append((j.task_id, j.seq, j.domain, j.kind, j.priority, j.state, params,
                         j.created_at, j.started_at, j.finished_at,
                         self.deadlines.get(j.task_id), j.attempts, j.interrupted,
                         int(j.detached), _pack(j.result), _pack(j.error)))
        frame = pack(rows)
        with self.journal_lock:
            end = self.jend
            try:
                written = os.write(self.jfd, FRAME.pack(len(frame)) + frame)
                if written != FRAME.size + len(frame):
                    raise OSError(errno.ENOSPC, "short write to the journal")
                self.jend = end + written
            except OSError as exc:
                # cut the torn frame off (replay would stop at it, and at all after it); the
                # changes stay pending, in memory, and go out with the next commit that fits
                try:
                    os.ftruncate(self.jfd, end)
                except OSError:
                    pass
                if self.full is None:
                    log.error("cannot write the job journal (%s): new jobs are refused with "
                              "storage_full until there is space in %s", exc.strerror,
                              os.path.dirname(self.path))
                self.full = exc
                return
            self.appended += 1
        if self.full is not None:
            log.warning("the job journal is writable again; new jobs are accepted")
            self.full = None
        for task_id, j in self.pending.items():
            self.deadlines.pop(task_id, None)
            if j.finished_at is not None:  # finished for good: no more changes to write
                packed.pop(task_id, None)
        self.pending.clear()
        self.batches.put(rows)

    def sweep(self, before: float, files_under: str) -> None:
        """Ask the writer to delete up to SWEEP_CHUNK jobs that finished before `before`."""
        self.batches.put(Sweep(before, files_under))

    def _apply_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            item = self.batches.get()
            if item is None:
                return
            if type(item) is not Sweep and not self.flushing.is_set():
                self.flushing.wait(APPLY_EVERY_S)
            groups: list[list] = []
            sweeps: list[Sweep] = []
            while item is not None:  # all that queued up meanwhile goes in one transaction
                (sweeps if type(item) is Sweep else groups).append(item)
                try:
                    item = self.batches.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.batches.put(None)
            if groups:
                self._apply(groups)
                now = time.monotonic()
                if now - last_sync >= FSYNC_EVERY_S:
                    os.fdatasync(self.jfd)
                    last_sync = now
            for sweep in sweeps:  # after every upsert queued before it
                self._sweep(sweep)

    def _apply(self, groups: list[list]) -> None:
        # rows are whole jobs: only the last state of each job in the group is written,
        # so a job accepted and finished within one group costs one upsert, not three
        latest = {row[0]: row for g in groups for row in g}
        failing = False
        while True:
            try:
                with self.db_lock:
                    self.db.executemany(UPSERT, latest.values())
                    self.db.commit()
                break
            except sqlite3.OperationalError as exc:  # a full disk: the journal holds the rows
                with self.db_lock:
                    self.db.rollback()
                if not failing:
                    log.error("cannot write the job database (%s); retrying", exc)
                    failing = True
                if self.closing:
                    return  # not counted as applied: the journal is kept for the next start
                time.sleep(DISK_FULL_RETRY_S)
        with self.journal_lock:
            self.applied += len(groups)
            if self.applied == self.appended and self.jend > JOURNAL_TRUNCATE_BYTES:
                os.ftruncate(self.jfd, 0)  # all of it is in SQLite now
                self.jend = 0
        with self.applied_cv:
            self.applied_cv.notify_all()

    def _sweep(self, sweep: Sweep) -> None:
        with self.db_lock:
            rows = list(self.db.execute(
                "SELECT task_id, result FROM jobs WHERE finished_at IS NOT NULL AND "
                "finished_at < ? ORDER BY finished_at LIMIT ?", (sweep.before, SWEEP_CHUNK)))
            self.db.executemany("DELETE FROM jobs WHERE task_id=?", [(r[0],) for r in rows])
            self.db.commit()
            more = len(rows) == SWEEP_CHUNK
            if not more:
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        for _, result in rows:
            for key, value in (_unpack(result) or {}).items():
                if key.endswith("_path") and isinstance(value, str) and \
                        value.startswith(sweep.files_under):
                    try:
                        os.unlink(value)
                    except FileNotFoundError:
                        pass
        self.swept.put(([r[0] for r in rows], more))

    def flush(self) -> None:
        """Wait until SQLite holds everything committed so far."""
        self.commit()
        self.flushing.set()
        try:
            with self.applied_cv:
                self.applied_cv.wait_for(lambda: self.applied >= self.appended, timeout=30)
        finally:
            self.flushing.clear()

    # --- reads (SQLite) -------------------------------------------------------------------------
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

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.db_lock:
            return list(self.db.execute(sql, args))

    def unfinished(self) -> Iterator[tuple[Job, float | None]]:
        """Queued and running jobs, in their original order."""
        for row in self._query("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY seq",
                               (JobState.QUEUED, JobState.RUNNING)):
            yield self._job(row)

    def recent_finished(self, limit: int) -> list[Job]:
        rows = self._query("SELECT * FROM jobs WHERE finished_at IS NOT NULL "
                           "ORDER BY seq DESC LIMIT ?", (limit,))
        return [self._job(r)[0] for r in rows][::-1]

    def get(self, task_id: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE task_id=?", (task_id,))
        return self._job(rows[0])[0] if rows else None

    def max_seq(self) -> int:
        return self._query("SELECT COALESCE(MAX(seq), 0) FROM jobs")[0][0]

    def close(self) -> None:
        self.flush()
        self.closing = True
        self.batches.put(None)
        self.writer.join(30)
        with self.db_lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # the WAL stays; SQLite replays it at the next open
            self.db.close()
        if self.pending:
            log.error("%d job changes could not be written (no space left) and are lost",
                      len(self.pending))
        os.fsync(self.jfd)
        if self.applied == self.appended:
            os.ftruncate(self.jfd, 0)  # everything is in the database
        os.close(self.jfd)
