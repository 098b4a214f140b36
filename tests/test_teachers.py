"""Teachers and the response cache: no query paid twice, budgets, validation, concurrency."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest

from kdd_jax.config import parse_config
from kdd_jax.models import build_model
from kdd_jax.teachers import (
    CachedTeacher,
    CallableTeacher,
    InputSpec,
    QueryBudgetExceeded,
    ResponseCache,
    TeacherError,
    TeacherOutput,
    flax_teacher,
    logits_to_output,
)
from tests.conftest import full_config

SPEC = InputSpec((4, 4), 1)


def linear_teacher(name="lin", output="logits", calls=None, c=5):
    w = np.random.default_rng(0).normal(size=(16, c)).astype(np.float32)

    def fn(x):
        if calls is not None:
            calls.append(len(x))
        return x.reshape(len(x), -1) @ w

    return CallableTeacher(name, fn, num_classes=c, spec=SPEC, output=output, k=3)


def probes(n, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 1, 4, 4)).astype(np.float32)


@pytest.mark.parametrize("kind", ["logits", "probs", "topk", "labels"])
def test_cache_rerun_makes_zero_queries_and_returns_identical_answers(kind, tmp_path):
    calls = []
    first = CachedTeacher(linear_teacher(output=kind, calls=calls), ResponseCache(tmp_path / "c.sqlite"), batch_size=7)
    x = probes(20)
    a = first.query(x)
    assert first.stats.queries == 20 and first.stats.misses == 20 and sum(calls) == 20 and len(calls) == 3
    again = CachedTeacher(linear_teacher(output=kind, calls=calls), ResponseCache(tmp_path / "c.sqlite"))
    b = again.query(x)
    assert again.stats.queries == 0 and again.stats.hits == 20 and sum(calls) == 20
    for f in ("values", "indices"):
        if getattr(a, f) is not None:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    direct = linear_teacher(output=kind).query(x)
    for f in ("values", "indices"):
        if getattr(direct, f) is not None:
            np.testing.assert_array_equal(getattr(direct, f), getattr(b, f))


def test_partial_overlap_and_duplicates_are_asked_once(tmp_path):
    calls = []
    t = CachedTeacher(linear_teacher(calls=calls), ResponseCache(tmp_path / "c.sqlite"))
    t.query(probes(10))
    x = np.concatenate([probes(10)[:4], probes(3, seed=9), probes(3, seed=9)])
    out = t.query(x)
    assert t.stats.queries == 13 and sum(calls) == 13  # 10 + 3 new distinct probes
    np.testing.assert_array_equal(out.values[-3:], out.values[-6:-3])


def test_cache_keys_separate_teachers_and_kinds(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    x = probes(5)
    CachedTeacher(linear_teacher("a"), cache).query(x)
    b = CachedTeacher(linear_teacher("b"), cache)
    b.query(x)
    p = CachedTeacher(linear_teacher("a", output="probs"), cache)
    p.query(x)
    assert b.stats.queries == 5 and p.stats.queries == 5 and cache.count() == 15


def test_budget_aborts_before_sending_anything(tmp_path):
    calls = []
    t = CachedTeacher(linear_teacher(calls=calls), ResponseCache(tmp_path / "c.sqlite"), budget=12)
    t.query(probes(10))
    with pytest.raises(QueryBudgetExceeded, match="'lin'.*2 left"):
        t.query(probes(5, seed=1))
    assert sum(calls) == 10 and t.stats.queries == 10
    t.query(probes(10))  # cached answers cost nothing
    assert t.stats.queries == 10


class BadTeacher:
    name, output, num_classes, spec = "bad", "probs", 3, SPEC

    def __init__(self, answer):
        self.answer = answer

    def query(self, inputs):
        from kdd_jax.teachers import validate_output

        return validate_output(self.answer(len(inputs)), len(inputs), self.num_classes, self.name)


@pytest.mark.parametrize(
    "answer, message",
    [
        (lambda n: TeacherOutput("probs", values=np.full((n, 3), np.nan, np.float32)), "non-finite"),
        (lambda n: TeacherOutput("probs", values=np.full((n + 1, 3), 1 / 3, np.float32)), "rows for a batch"),
        (lambda n: TeacherOutput("probs", values=np.full((n, 4), 0.25, np.float32)), "shape"),
        (lambda n: TeacherOutput("probs", values=np.full((n, 3), 0.5, np.float32)), "sum to 1"),
    ],
)
def test_bad_answers_are_named_and_never_cached(answer, message, tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    with pytest.raises(TeacherError, match=f"'bad'.*{message}|{message}"):
        CachedTeacher(BadTeacher(answer), cache).query(probes(4))
    assert cache.count() == 0


def test_logits_to_output_kinds_are_consistent():
    logits = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
    probs = logits_to_output(logits, "probs").values
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)
    top = logits_to_output(logits, "topk", k=3)
    assert (top.indices[:, 0] == logits.argmax(-1)).all() and (np.diff(top.values, axis=-1) <= 0).all()
    np.testing.assert_array_equal(logits_to_output(logits, "labels").indices, logits.argmax(-1))


def test_flax_teacher_normalises_in_its_own_input_space():
    cfg = parse_config(full_config("resnet20"))
    model = build_model(cfg, seed=3)
    teacher = flax_teacher("r20", model, cfg, output="logits")
    raw = probes(2).repeat(3, 1).repeat(8, 2).repeat(8, 3)  # [2, 3, 32, 32] in [0, 1]
    pre = cfg.preprocessing
    x = (raw.transpose(0, 2, 3, 1) - np.asarray(pre.mean)) / np.asarray(pre.std)
    np.testing.assert_allclose(teacher.query(raw).values, np.asarray(model(x.astype(np.float32))), rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherError, match="'r20'.*expected"):
        teacher.query(raw[:, :, :16])


def _writer(path, seed, n):
    t = CachedTeacher(linear_teacher(), ResponseCache(path))
    t.query(probes(n, seed=seed))
    t.query(probes(n, seed=0))


def test_concurrent_processes_share_one_cache(tmp_path):
    path = tmp_path / "shared.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, s, 40)) for s in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = ResponseCache(path)
    assert cache.count() == 4 * 40  # seeds 0..3, each probe stored exactly once
    t = CachedTeacher(linear_teacher(), cache)
    out = t.query(np.concatenate([probes(40, seed=s) for s in range(4)]))
    assert t.stats.queries == 0
    np.testing.assert_allclose(out.values, linear_teacher().query(np.concatenate([probes(40, seed=s) for s in range(4)])).values)


def test_setting_up_a_shared_cache_waits_out_locks():
    """Processes of a multi-process audit open the same new cache at once; switching it to WAL
    and creating the schema can get 'database is locked' at once instead of waiting (seen in CI
    with 2 processes). `_retry_locked` retries those, and only those, until its deadline."""
    import sqlite3

    from kdd_jax.teachers.cache import _retry_locked

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert _retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _retry_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: x")))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _retry_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")), seconds=0.05)


# ----------------------------------------------------------------------------- in-flight claims


def _inflight(path):
    import sqlite3

    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT key, owner, pid FROM inflight").fetchall()


def slow_teacher(asked, delay=0.15):
    w = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)  # linear_teacher's weights

    def fn(x):
        asked.extend(p.tobytes() for p in x)
        time.sleep(delay)
        return x.reshape(len(x), -1) @ w

    return CallableTeacher("lin", fn, num_classes=5, spec=SPEC, output="logits", k=3)


def test_concurrent_misses_of_the_same_probes_are_paid_once(tmp_path):
    """Two queries (threads, each with its own cache connection) miss the same probes at the same
    time: each probe is sent once, both get every answer; what one did not ask it either waited for
    or found already stored."""
    path = tmp_path / "c.sqlite"
    asked, outs, stats, errors = [], {}, {}, []
    shared, own = probes(24, seed=1), {0: probes(6, seed=2), 1: probes(6, seed=3)}
    start = threading.Barrier(2)

    def run(i):
        try:
            t = CachedTeacher(slow_teacher(asked), ResponseCache(path), batch_size=8)
            x = np.concatenate([shared, own[i]]) if i == 0 else np.concatenate([own[i], shared[::-1]])
            start.wait(30)
            outs[i], stats[i] = (x, t.query(x)), t.stats
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and not any(th.is_alive() for th in threads)
    assert len(asked) == len(set(asked)) == 24 + 12  # every distinct probe sent exactly once
    assert stats[0].queries + stats[1].queries == 36
    assert stats[0].waited + stats[0].hits + stats[1].waited + stats[1].hits == 24
    for x, out in outs.values():
        np.testing.assert_allclose(out.values, linear_teacher().query(x).values, rtol=1e-6)
    assert _inflight(path) == []  # every claim released


def test_stale_claims_are_taken_over_and_live_ones_waited_for(tmp_path):
    import os
    import sqlite3
    import subprocess
    import sys

    from kdd_jax.teachers.cache import _HOST, _PROCESS, probe_key

    path = tmp_path / "c.sqlite"
    cache = ResponseCache(path)
    x = probes(7)
    keys = [probe_key("lin", "logits", p) for p in x]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now, pid = time.time(), os.getpid()
    with sqlite3.connect(path) as conn:  # stale: a finished process (this host), an earlier process with this
        conn.executemany("INSERT INTO inflight VALUES (?, ?, ?, ?, ?)", [  # PID, another host's expired lease
            (keys[0], f"{_HOST}:{int(dead.stdout)}:x:q", _HOST, int(dead.stdout), now + 30),
            (keys[1], f"{_HOST}:{pid}:earlier:q", _HOST, pid, now + 30),
            (keys[2], "far:1:x:q", "far", 1, now - 1)])
    calls = []
    t = CachedTeacher(linear_teacher(calls=calls), cache)
    t0 = time.monotonic()
    t.query(x[:3])
    assert sum(calls) == 3 and time.monotonic() - t0 < 5 and _inflight(path) == []

    # live: another query of this very process (even past its lease: on its host a claim lasts as long
    # as its process), and another host's unexpired lease; both are waited for, not asked again
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO inflight VALUES (?, ?, ?, ?, ?)",
                         [(k, f"{_HOST}:{pid}:{_PROCESS}:busy", _HOST, pid, now - 1) for k in keys[3:6]]
                         + [(keys[6], "far:1:x:q", "far", 1, now + 30)])
    answers = linear_teacher().query(x).values
    answer = threading.Timer(0.4, lambda: ResponseCache(path).put_many(  # the claims' owners store their answers
        "lin", "logits", [(k, np.asarray(answers[i], np.float32).tobytes(), None) for i, k in enumerate(keys) if i >= 3]))
    calls.clear()
    t0 = time.monotonic()
    answer.start()
    out = t.query(x)
    answer.join(10)
    assert calls == [] and time.monotonic() - t0 >= 0.35 and t.stats.waited == 4
    np.testing.assert_allclose(out.values, answers, rtol=1e-6)
    assert _inflight(path) == []


def test_a_failed_query_releases_its_claims(tmp_path):
    from kdd_jax.teachers.cache import CacheStats, cached_query

    path = tmp_path / "c.sqlite"

    def broken(x):
        raise TeacherError("teacher 'lin' is down")

    t = CachedTeacher(CallableTeacher("lin", broken, num_classes=5, spec=SPEC, output="logits"), ResponseCache(path))
    with pytest.raises(TeacherError, match="down"):
        t.query(probes(4))
    assert _inflight(path) == []  # a later query asks at once instead of waiting for the process to end
    # an unvalidated ask that answers fewer rows than asked is an error, not a probe asked again forever
    with pytest.raises(TeacherError, match="answered 2 rows for 4 probes"):
        cached_query(ResponseCache(path), "lin", "logits", probes(4), lambda x: linear_teacher().query(x[:2]),
                     stats=CacheStats())
    assert _inflight(path) == []
    ok = CachedTeacher(linear_teacher(), ResponseCache(path))
    t0 = time.monotonic()
    ok.query(probes(4))
    assert ok.stats.queries == 4 and time.monotonic() - t0 < 5
