"""Persistent teacher-response cache: no query is ever paid for twice.

Every answer is stored per probe, keyed by SHA-256 of (teacher name, output kind, input dtype,
shape and exact bytes), in SQLite (WAL journal: concurrent readers and writers across processes;
each batch is one transaction, so a crash loses at most the batch in flight, never corrupts).
The first answer stored for a key wins: a repeated or concurrent query never overwrites it.

Probes being asked are claimed in the same database (table `inflight`), so processes (and threads)
that miss the cache for the same probes at the same time pay for them once: the first claims and
asks, the others wait for its answers. On the claimant's host a claim lasts as long as its process
(a claim of a process that is gone, or of an earlier process that had this one's PID, is taken over
at once); a claim from another host lasts for a lease its owner renews while it asks. A query
releases its claims when it ends, answered or not, so a crash or an error never strands the probes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdd_jax.teachers.base import TeacherError, TeacherOutput

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key      TEXT PRIMARY KEY,
    teacher  TEXT NOT NULL,
    kind     TEXT NOT NULL,
    vals     BLOB,           -- float32 row (logits / probs / top-k probs)
    idx      BLOB,           -- int32 row (top-k indices) or a single label
    created  REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inflight (
    key      TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,  -- the claiming query: host:pid:process token:query token
    host     TEXT NOT NULL,
    pid      INTEGER NOT NULL,
    expires  REAL NOT NULL   -- time.time() after which another host may take the claim over
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inflight_owner ON inflight (owner);
"""
CLAIM_LEASE_S = 300.0  # a claim's lifetime for other hosts; its owner renews it every quarter of that
_HOST = socket.gethostname()
_PROCESS = uuid.uuid4().hex  # tells this process from an earlier one that had its PID (a restarted container)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot be told: trust the lease
    return True


def probe_key(teacher: str, kind: str, probe: np.ndarray) -> str:
    """Content hash of one probe as sent to one teacher for one output kind."""
    probe = np.ascontiguousarray(probe)
    h = hashlib.sha256()
    h.update(f"{teacher}\0{kind}\0{probe.dtype.str}\0{probe.shape}\0".encode())
    h.update(probe.tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    queries: int = 0  # probes actually sent to teachers
    batches: int = 0
    waited: int = 0  # probes another query was asking: answered by it, not sent again


def _retry_locked(fn, seconds: float = 60.0):
    """Run `fn`, retrying while SQLite reports the database locked, for up to `seconds`.

    Why: when several processes open a fresh cache at once (a multi-process audit), switching it
    to WAL and creating the schema need an exclusive lock, and SQLite returns "database is
    locked" at once there instead of waiting out its busy timeout (seen in CI with 2 processes)."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class ResponseCache:
    """SQLite-backed store of teacher answers. Thread-safe; safe across processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            conn = self._conn()
            _retry_locked(lambda: conn.executescript(SCHEMA))
        except sqlite3.DatabaseError as e:  # nothing is overwritten; say what is wrong with the file
            conn, self._local.conn = getattr(self._local, "conn", None), None
            if conn is not None:
                conn.close()
            if self.path.is_dir():
                raise ValueError(f"response cache {self.path} is a directory; point --cache at another "
                                 "directory") from None
            if "not a database" in str(e):
                raise ValueError(f"response cache {self.path} is not an SQLite database ({e}); point --cache at "
                                 "another directory, or move this file away if it is not a kdd-jax cache") from None
            # locked past the wait, read-only, disk full, I/O error: a valid cache, named with the fault
            raise ValueError(f"response cache {self.path}: {e}") from None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._local.conn = conn
        return conn

    def get_many(self, keys: list[str]) -> dict[str, tuple[str, bytes | None, bytes | None]]:
        found = {}
        conn = self._conn()
        for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 500]
            rows = conn.execute(
                f"SELECT key, kind, vals, idx FROM responses WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            found.update({k: (kind, v, x) for k, kind, v, x in rows})
        return found

    def put_many(self, teacher: str, kind: str, items: list[tuple[str, bytes | None, bytes | None]]) -> None:
        """Store answers (first one wins) and, in the same transaction, drop the claims on them."""
        conn = self._conn()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO responses (key, teacher, kind, vals, idx, created) VALUES (?, ?, ?, ?, ?, ?)",
                [(k, teacher, kind, v, x, now) for k, v, x in items],
            )
            conn.executemany("DELETE FROM inflight WHERE key = ?", [(k,) for k, _, _ in items])  # answered now
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def claim(self, keys: list[str], owner: str, lease: float = CLAIM_LEASE_S
              ) -> tuple[list[str], dict[str, tuple[str, bytes | None, bytes | None]]]:
        """Claim the unanswered `keys` nobody else is asking, in one transaction.

        Returns (claimed keys, answers already stored). Keys in neither are being asked by a live
        query elsewhere. A claim whose process is gone (this host) or whose lease has expired is
        taken over."""
        conn = self._conn()
        now = time.time()
        mine: list[str] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = self.get_many(keys)
            rest = [k for k in keys if k not in done]
            held = {}
            for i in range(0, len(rest), 500):
                chunk = rest[i : i + 500]
                held.update({k: (o, h, p, e) for k, o, h, p, e in conn.execute(
                    f"SELECT key, owner, host, pid, expires FROM inflight WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk)})
            pid = os.getpid()
            alive: dict[int, bool] = {}
            for k in rest:
                h = held.get(k)
                if h is None or h[0] == owner:
                    mine.append(k)
                elif h[1] == _HOST:  # same host: the claim lives exactly as long as its process
                    p = h[2]
                    if p == pid:  # this PID: ours if the process token matches, else an earlier process's
                        stale = h[0].split(":")[2:3] != [_PROCESS]
                    else:
                        stale = not alive.setdefault(p, _pid_alive(p))
                    if stale:
                        mine.append(k)
                elif h[3] < now:  # another host's claim whose owner stopped renewing it
                    mine.append(k)
            conn.executemany("INSERT OR REPLACE INTO inflight (key, owner, host, pid, expires) VALUES (?, ?, ?, ?, ?)",
                             [(k, owner, _HOST, pid, now + lease) for k in mine])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return mine, done

    def renew(self, owner: str, lease: float = CLAIM_LEASE_S) -> None:
        """Extend `owner`'s claims (for other hosts: on its own host a claim lasts as long as its process)."""
        _retry_locked(lambda: self._conn().execute("UPDATE inflight SET expires = ? WHERE owner = ?",
                                                   (time.time() + lease, owner)))

    def release(self, owner: str) -> None:
        """Drop every claim of `owner` (its query ended, answered or not)."""
        _retry_locked(lambda: self._conn().execute("DELETE FROM inflight WHERE owner = ?", (owner,)))

    def count(self, teacher: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM responses", ()
        if teacher is not None:
            sql, args = sql + " WHERE teacher = ?", (teacher,)
        return self._conn().execute(sql, args).fetchone()[0]


def _row_bytes(out: TeacherOutput, i: int) -> tuple[bytes | None, bytes | None]:
    v = None if out.values is None else np.asarray(out.values[i], np.float32).tobytes()
    x = None if out.indices is None else np.asarray(out.indices[i], np.int32).tobytes()
    return v, x


def _from_rows(kind: str, rows: list[tuple[bytes | None, bytes | None]]) -> TeacherOutput:
    vals = None if rows[0][0] is None else np.stack([np.frombuffer(v, np.float32) for v, _ in rows])
    idx = None if rows[0][1] is None else np.stack([np.frombuffer(x, np.int32) for _, x in rows])
    if kind == "labels":
        idx = idx.reshape(-1)
    return TeacherOutput(kind, vals, idx)


def check_budget(budget, teacher: str) -> None:
    """ValueError unless `budget` is None (no limit) or a whole number of queries >= 0."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"teacher {teacher!r}: the query budget must be a whole number >= 0 (--budget), got {budget!r}")


class QueryBudgetExceeded(RuntimeError):
    """The run would send more probes to teachers than its budget allows; nothing was sent."""


def cached_query(
    cache: ResponseCache,
    teacher_name: str,
    kind: str,
    inputs: np.ndarray,
    ask: Callable[[np.ndarray], TeacherOutput],
    *,
    stats: CacheStats,
    batch_size: int = 256,
    budget: int | None = None,
    streams: bool = False,
    keys: list[str] | None = None,
) -> TeacherOutput:
    """Answers for every probe in `inputs`: from the cache where present, else from `ask` in
    batches, each batch stored (one transaction) as soon as it is answered. With `streams`,
    `ask(x, on_part=cb)` hands over the parts of a batch as they arrive (an HTTP teacher's
    requests) and each is stored at once. `keys` (one per probe) replace `probe_key` for probes
    that are not one array (a generative request: prompt + noise); `inputs[rows]` must then
    select rows by a list of indices. Rows come back as stored: flat float32 / int32.

    Misses are claimed before they are asked (`ResponseCache.claim`); misses that another query
    holds are waited for and counted in `stats.waited`, not asked again."""
    if keys is None:
        keys = [probe_key(teacher_name, kind, p) for p in inputs]
    found = cache.get_many(list(dict.fromkeys(keys)))
    missing = [i for i, k in enumerate(keys) if k not in found]
    # identical probes in one request are asked once
    first_of = {}
    for i in missing:
        first_of.setdefault(keys[i], i)
    to_ask = sorted(first_of.values())
    stats.hits += len(keys) - len(missing)
    stats.misses += len(missing)
    if budget is not None and stats.queries + len(to_ask) > budget:
        raise QueryBudgetExceeded(
            f"teacher {teacher_name!r}: {len(to_ask)} new queries needed, {budget - stats.queries} left of the budget {budget}"
        )
    lock = threading.Lock()
    owner = f"{_HOST}:{os.getpid()}:{_PROCESS}:{uuid.uuid4().hex}"

    def ask_rows(rows: list[int]) -> None:
        def store(offset: int, out: TeacherOutput, rows=rows) -> None:
            part = rows[offset : offset + len(out)]
            items = [(keys[r], *_row_bytes(out, j)) for j, r in enumerate(part)]
            cache.put_many(teacher_name, kind, items)
            with lock:  # streamed parts arrive on the teacher's worker threads
                stats.queries += len(part)
                stats.batches += 1
                found.update({k: (kind, v, x) for k, v, x in items})

        if streams:  # each request's answers are stored as they arrive: a later failure loses none
            ask(inputs[rows], on_part=store)
            if any(keys[r] not in found for r in rows):
                raise TeacherError(f"teacher {teacher_name!r} returned without handing over every part")
        else:
            out = ask(inputs[rows])
            if len(out) != len(rows):
                raise TeacherError(f"teacher {teacher_name!r} answered {len(out)} rows for {len(rows)} probes")
            store(0, out)

    pending, delay = to_ask, 0.02
    stop = threading.Event()
    if to_ask:  # renew the lease while asking (it matters to other hosts; a slow, retried request can outlast it)
        threading.Thread(target=_heartbeat, args=(cache, owner, stop), daemon=True,
                         name=f"kdd-claims-{teacher_name}").start()
    try:
        while pending:
            claimed, done = cache.claim([keys[i] for i in pending], owner)
            found.update(done)
            stats.waited += len(done)
            claimed = set(claimed)
            mine = [i for i in pending if keys[i] in claimed]
            for start in range(0, len(mine), batch_size):
                ask_rows(mine[start : start + batch_size])
            pending = [i for i in pending if keys[i] not in found]
            if pending:  # being asked by another query: wait for its answers (or for its claim to lapse)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                got = cache.get_many([keys[i] for i in pending])
                found.update(got)
                stats.waited += len(got)
                pending = [i for i in pending if keys[i] not in found]
    finally:
        stop.set()
        if to_ask:
            cache.release(owner)
    return _from_rows(kind, [found[k][1:] for k in keys])


def _heartbeat(cache: ResponseCache, owner: str, stop: threading.Event, lease: float = CLAIM_LEASE_S) -> None:
    while not stop.wait(lease / 4):
        try:
            cache.renew(owner, lease)
        except sqlite3.Error:  # a renewal that fails only shortens the lease other hosts see
            pass


class CachedTeacher:
    """A teacher behind the response cache, with a query budget and hit/miss accounting.

    Answers are validated by the teacher before they are stored: nothing wrong is cached."""

    def __init__(self, teacher, cache: ResponseCache, *, batch_size: int = 256, budget: int | None = None):
        check_budget(budget, teacher.name)
        self.teacher, self.cache, self.batch_size, self.budget = teacher, cache, batch_size, budget
        self.stats = CacheStats()
        self.name, self.output, self.num_classes = teacher.name, teacher.output, teacher.num_classes
        self.spec = teacher.spec

    def query(self, inputs: np.ndarray) -> TeacherOutput:
        return cached_query(self.cache, self.name, self.output, np.asarray(inputs, np.float32), self.teacher.query,
                            stats=self.stats, batch_size=self.batch_size, budget=self.budget,
                            streams=getattr(self.teacher, "streams_parts", False))
