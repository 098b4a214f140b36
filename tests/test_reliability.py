"""Reliability and security invariants not covered elsewhere (issue #6; the figures come from
benchmarks/reliability.py, which shares this file's fault server, tests/fault_server.py).

Hostile files: YAML teachers files (alias bombs, code tags), pool files holding code-carrying
pickles, configs deeper than their checkpoint, fuzzed config.json / teachers files / teacher API
answers. Network: `kdd serve` answers every fuzzed body with 200 or a 4xx JSON error, model names
cannot reach the filesystem. Flaky APIs: a whole detection interrupted by a wrong answer and
re-run pays for nothing twice and ends with the fault-free verdict. Interrupted work: processes
sharing one cache, one of them SIGKILLed mid-write; SIGKILLed `kdd detect` / `kdd audit` (slow).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdd_jax.config import ConfigError, StudentConfig, load_config, parse_config
from kdd_jax.teachers import (
    CachedTeacher,
    CallableTeacher,
    HttpTeacher,
    InputSpec,
    ResponseCache,
    TeacherError,
    probe_key,
)
from kdd_jax.teachers.base import validate_output
from kdd_jax.teachers.config import load_teachers_file
from tests.conftest import CONFIGS, full_config
from benchmarks.reliability import cache_writer, writer_task, yaml_bomb  # shared with the benchmark
from tests.fault_server import FaultServer

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
                 st.floats(), st.text(max_size=6), st.sampled_from(["..", "../../etc/passwd", "a/b", "\x00", "\ud800"]))
junk = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=16)


def mutate(draw, doc):
    """A copy of `doc` with one value somewhere replaced by junk (or a key dropped / added)."""
    doc = json.loads(json.dumps(doc))
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(doc, ())
    path = draw(st.sampled_from(paths[1:]))
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    op = draw(st.sampled_from(["set", "set", "drop", "add"]))
    if op == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(junk)
    else:
        parent[path[-1]] = draw(junk)
    return doc


# ------------------------------------------------------------------------------ hostile files


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """A 450-byte YAML file whose aliases expand to 9^9 values: every error message that printed a
    field's value would hold gigabytes. Refused at once, in a small message."""
    f = tmp_path / "t.yaml"
    f.write_text(yaml_bomb(9))
    assert f.stat().st_size < 600
    start = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than") as e:
        load_teachers_file(f)
    assert time.monotonic() - start < 2.0 and len(str(e.value)) < 300 and str(f) in str(e.value)
    f.write_text("teachers: &a [*a]\n")  # an alias cycle
    with pytest.raises(ConfigError, match="expands"):
        load_teachers_file(f)


def test_yaml_anchors_and_merges_stay_usable(tmp_path):
    """The expansion limit is linear in the file size: ordinary anchors and merge keys pass."""
    f = tmp_path / "t.yaml"
    f.write_text("teachers:\n  - &c {name: a, kind: http, url: 'http://127.0.0.1:9', input_size: [8, 8], channels: 1, "
                 "num_classes: 7}\n" + "".join(f"  - {{<<: *c, name: t{i}, model: m{i}}}\n" for i in range(30)))
    entries = load_teachers_file(f)
    assert [e.name for e in entries] == ["a", *(f"t{i}" for i in range(30))]
    assert entries[-1].model == "m29" and entries[-1].input_size == (8, 8) and entries[-1].num_classes == 7


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/apply:builtins.exec",
                                 "!!python/object/new:os.system"])
def test_yaml_code_tags_never_run(tmp_path, tag):
    marker = tmp_path / "PWNED"
    f = tmp_path / "t.yaml"
    arg = f"touch {marker}" if "os.system" in tag else f"open({str(marker)!r}, 'w')"
    f.write_text(f"teachers:\n  - {tag} [{json.dumps(arg)}]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_teachers_file(f)
    assert not marker.exists()


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_pool_files_holding_pickles_are_never_unpickled(tmp_path, kind):
    """--pool files: .npy/.npz object arrays are pickles; read_arrays refuses them unread."""
    from kdd_jax.io import CheckpointError, read_arrays

    marker = tmp_path / "PWNED"
    path = tmp_path / f"pool.{kind}"
    arr = np.array([Evil(marker), 1], dtype=object)
    if kind == "npy":
        np.save(path, arr, allow_pickle=True)
    else:
        np.savez(path, images=arr)
    with pytest.raises(CheckpointError, match=str(path)):
        read_arrays(path, "pool")
    assert not marker.exists()
    loaded = np.load(path, allow_pickle=True)  # control: the payload is live
    if kind == "npz":
        loaded["images"]
    assert marker.exists()


def test_config_deeper_than_its_checkpoint_is_refused_before_building(make_student):
    """Building a model costs more than linear time in its depth (200 ResNet blocks: ~15 s here),
    so a 60-byte edit of config.json could stall a conversion for hours. Every layer needs at
    least one tensor: a config asking for more layers than the file holds tensors is refused
    before anything is built."""
    from converters import ConversionError, convert_student

    cfg = full_config("vgg_bn_torchvision")
    d = make_student("vgg_bn_torchvision")
    cfg["arch"]["cfg"] = [8] * 5000
    (d / "config.json").write_text(json.dumps(cfg))
    start = time.monotonic()
    with pytest.raises(ConversionError, match="asks for 5000 layers but the checkpoint holds only"):
        convert_student(d)
    assert time.monotonic() - start < 5.0


CONFIG_BASES = [full_config(n) for n in CONFIGS]


@FUZZ
@given(data=st.data())
def test_fuzzed_config_json_is_accepted_or_a_config_error_naming_it(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    choice = data.draw(st.sampled_from(["mutated", "mutated", "junk", "bytes"]))
    if choice == "mutated":
        text = json.dumps(mutate(data.draw, data.draw(st.sampled_from(CONFIG_BASES)))).encode()
    elif choice == "junk":
        text = json.dumps(data.draw(junk)).encode()
    else:
        raw = bytearray(json.dumps(data.draw(st.sampled_from(CONFIG_BASES))).encode())
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
        text = bytes(raw)
    path.write_bytes(text)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert str(path) in str(e)
        return
    assert isinstance(cfg, StudentConfig)
    assert parse_config(cfg.to_dict()) == cfg  # what is accepted round-trips


TEACHERS_BASE = {"teachers": [
    {"name": "local-a", "path": "teachers/a", "output": "probs"},
    {"name": "api", "kind": "http", "url": "http://127.0.0.1:9/p", "model": "m", "output": "topk", "k": 3,
     "input_size": [12, 12], "channels": 1, "value_range": [0, 1], "num_classes": 6, "token_env": "T"}]}


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzzed_teachers_file_is_accepted_or_a_config_error_naming_it(tmp_path_factory, data, suffix):
    from kdd_jax.teachers.config import TeacherEntry

    path = tmp_path_factory.mktemp("tf") / f"teachers{suffix}"
    doc = mutate(data.draw, TEACHERS_BASE) if data.draw(st.booleans()) else data.draw(junk)
    path.write_text(json.dumps(doc), encoding="utf-8", errors="surrogatepass")
    try:
        entries = load_teachers_file(path)
    except ConfigError as e:
        assert str(path) in str(e)
        return
    assert entries and all(isinstance(e, TeacherEntry) for e in entries)


def _answer(kind: str, n: int) -> dict:
    from tests.fault_server import oip_outputs
    from kdd_jax.teachers import TeacherOutput

    v = np.full((n, 6), 1 / 6, np.float32)
    return {"outputs": oip_outputs({
        "logits": TeacherOutput("logits", values=v), "probs": TeacherOutput("probs", values=v),
        "topk": TeacherOutput("topk", values=v[:, :3].copy(), indices=np.tile(np.arange(3, dtype=np.int32), (n, 1))),
        "labels": TeacherOutput("labels", indices=np.zeros(n, np.int32))}[kind])}


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["logits", "probs", "topk", "labels"]), n=st.integers(1, 3))
def test_fuzzed_teacher_answers_are_accepted_or_a_teacher_error(data, kind, n):
    """Whatever a hostile API answers, the client raises TeacherError naming the teacher (never
    TypeError / OverflowError, which would crash `kdd detect`) or returns a valid answer."""
    doc = mutate(data.draw, _answer(kind, n)) if data.draw(st.booleans()) else data.draw(junk)
    t = HttpTeacher("hostile", "http://127.0.0.1:9", num_classes=6, spec=InputSpec((4, 4), 1), output=kind, k=3)
    try:
        out = validate_output(t._parse(json.dumps(doc).encode(), n), n, 6, t.name)
    except TeacherError as e:
        assert "'hostile'" in str(e)
        return
    assert len(out) == n and out.kind == kind


LOGITS = {"name": "logits", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}


@pytest.mark.parametrize("outputs", [
    [{**LOGITS, "name": ["logits"]}, {**LOGITS, "name": {"a": 1}}],  # unhashable names
    [{**LOGITS, "datatype": {"FP32": 1}}],  # unhashable datatype
    [{**LOGITS, "data": [10**400] + [0] * 5}],  # an integer beyond float range
    [{**LOGITS, "data": [1e300] + [0] * 5}],  # beyond float32's range
])
def test_hostile_answers_found_by_fuzzing_are_teacher_errors(outputs):
    t = HttpTeacher("hostile", "http://127.0.0.1:9", num_classes=6, spec=InputSpec((4, 4), 1), output="logits")
    with pytest.raises(TeacherError, match="'hostile'"):
        validate_output(t._parse(json.dumps({"outputs": outputs}).encode(), 1), 1, 6, t.name)


# ---------------------------------------------------------------------------------- kdd serve


@pytest.fixture(scope="module")
def served():
    from kdd_jax.teachers.server import make_server

    w = np.random.default_rng(3).normal(size=(16, 6)).astype(np.float32)
    teacher = CallableTeacher("t", lambda x: x.reshape(len(x), -1) @ w, num_classes=6, spec=InputSpec((4, 4), 1),
                              output="probs")
    server = make_server(teacher, name="m", max_request_bytes=1 << 16)
    import threading

    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def post(server, path: str, body: bytes, headers=None) -> tuple[int, dict | None]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        conn.close()


GOOD_BODY = {"inputs": [{"name": "input", "shape": [2, 1, 4, 4], "datatype": "FP32", "data": [0.25] * 32}],
             "outputs": [{"name": "probs"}]}


@FUZZ
@given(data=st.data())
def test_kdd_serve_answers_fuzzed_bodies_with_200_or_a_4xx_json_error(served, data):
    choice = data.draw(st.sampled_from(["mutated", "mutated", "junk", "bytes"]))
    if choice == "mutated":
        body = json.dumps(mutate(data.draw, GOOD_BODY)).encode()
    elif choice == "junk":
        body = json.dumps(data.draw(junk)).encode()
    else:
        raw = bytearray(json.dumps(GOOD_BODY).encode())
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
        body = bytes(raw)
    status, doc = post(served, "/v2/models/m/infer", body)
    assert status == 200 or (400 <= status < 500 and isinstance(doc["error"], str) and doc["error"]), (status, doc)
    if status == 200:
        assert doc["outputs"][0]["name"] == "probs"


@pytest.mark.parametrize("inputs, outputs, message", [
    ({"data": [10**400] + [0.25] * 31}, None, "beyond float32"),  # was a 500
    ({"data": [[0.25] * 4] * 7 + [0.25] * 4}, None, "ragged"),  # was accepted: mixed nesting
    ({}, [{"name": ["probs"]}], "string"),  # was a 500: unhashable output name
    ({}, [{"name": {"a": 1}}], "string"),
    ({}, ["probs"], "string"),
])
def test_kdd_serve_malformed_tensors_found_by_fuzzing_are_400(served, inputs, outputs, message):
    doc = json.loads(json.dumps(GOOD_BODY))
    doc["inputs"][0].update(inputs)
    if outputs is not None:
        doc["outputs"] = outputs
    status, answer = post(served, "/v2/models/m/infer", json.dumps(doc).encode())
    assert status == 400 and message in answer["error"], answer


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", "m%00", "m%2F..%2Fm", "%2Fetc%2Fpasswd",
                                  "M", "m%20"])
def test_kdd_serve_model_names_never_reach_the_filesystem(served, name, tmp_path, monkeypatch):
    """The served model is in memory under one name; a URL naming anything else is a 404, however
    encoded, and nothing is opened (the working directory holds a file the traversal would name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("secret")
    import builtins
    import threading

    opened = []
    real_open = builtins.open

    def spy(f, *a, **k):
        if "process_request" in threading.current_thread().name:  # the server's request threads only
            opened.append(f)
        return real_open(f, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    status, doc = post(served, f"/v2/models/{name}/infer", json.dumps(GOOD_BODY).encode())
    assert status == 404 and "unknown model" in doc["error"] and "secret" not in json.dumps(doc)
    assert opened == []


def test_kdd_serve_refuses_oversized_claims_and_chunked_bodies_without_reading_them(served):
    import socket

    s = socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=10)
    try:  # claims 10 GB, sends nothing: answered at once, never waits for or allocates the body
        s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        start = time.monotonic()
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 5
    finally:
        s.close()
    status, doc = post(served, "/v2/models/m/infer", b"", headers={"Transfer-Encoding": "chunked"})
    assert status == 411 and "Content-Length" in doc["error"]


def test_kdd_serve_oversized_bodies_get_their_413_not_a_connection_reset(served):
    """Closing while a large body is still arriving made the kernel reset the connection: clients
    saw a broken pipe (retried as a dropped connection) instead of the 413 (found by fuzzing)."""
    for _ in range(8):
        status, doc = post(served, "/v2/models/m/infer", b"x" * (3 << 20))
        assert status == 413 and "exceeds the limit" in doc["error"]
    client = HttpTeacher("m", f"http://127.0.0.1:{served.server_address[1]}", num_classes=6, spec=InputSpec((4, 4), 1),
                         output="probs", batch_size=20_000, max_retries=2, backoff_s=0.01)
    with pytest.raises(TeacherError, match="HTTP 413"):
        client.query(np.zeros((10_000, 1, 4, 4), np.float32))
    assert client.requests == 1  # a 413 is final: not retried


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed_so_the_token_stays_home(code, monkeypatch):
    """urllib follows a 301/302/303 answer to a POST as a GET to the new location with every
    header: a compromised or hostile API could collect the bearer token that way."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stolen = []

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            stolen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET  # noqa: N815

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(code)
            self.send_header("Location", f"http://localhost:{other.server_address[1]}/collect")
            self.send_header("Content-Length", "0")
            self.end_headers()

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Elsewhere, Redirect)]
    other, redirect = servers
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("KDD_TEST_TOKEN", "s3cr3t-redirected")
    t = HttpTeacher("api", f"http://127.0.0.1:{redirect.server_address[1]}", num_classes=5, spec=InputSpec((4, 4), 1),
                    output="logits", token_env="KDD_TEST_TOKEN", max_retries=1, backoff_s=0.01)
    try:
        with pytest.raises(TeacherError, match=f"'api'.*HTTP {code}") as e:
            t.query(np.zeros((2, 1, 4, 4), np.float32))
        assert stolen == [] and "s3cr3t" not in str(e.value) and t.requests == 1
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


# ------------------------------------------------------------------------------- flaky APIs

def test_detection_interrupted_by_a_wrong_answer_then_rerun_pays_nothing_twice(tmp_path):
    """Teacher B's fourth request comes back with NaN: the detection stops with TeacherError
    naming it. Every answer received before is in the cache; the re-run asks only for the rest
    and ends with exactly the fault-free verdict."""
    import jax

    from kdd_jax.detect import DetectConfig, detect
    from kdd_jax.models import build_model
    from kdd_jax.synthesis import SynthesisConfig

    from tests.test_http_teacher import TINY  # its compiled initialisers and scores are shared in a session

    cfg = parse_config(TINY)
    student = build_model(cfg, seed=0)
    weights = {n: np.random.default_rng(s).normal(size=(64, 7)).astype(np.float32) for n, s in (("a", 1), ("b", 2))}
    inner = {n: CallableTeacher(n, lambda x, w=w: x.reshape(len(x), -1) @ w, num_classes=7, spec=InputSpec((8, 8), 1),
                                output="probs") for n, w in weights.items()}
    # noise probes: this test is about the queries, so no synthesis to compile
    dc = DetectConfig(synthesis=SynthesisConfig(method="noise", n_probes=16, seed=0), n_bootstrap=100)
    spec = InputSpec((8, 8), 1)

    def run(servers, cache):
        teachers = [CachedTeacher(HttpTeacher(n, s.url, model=n, num_classes=7, spec=spec, output="probs", batch_size=4,
                                              concurrency=2, max_retries=1, backoff_s=0.01), cache, budget=16)
                    for n, s in servers.items()]
        return detect(student, cfg, teachers, dc)

    with jax.default_matmul_precision("highest"):
        clean = {n: FaultServer(teacher=t) for n, t in inner.items()}
        reference = run(clean, ResponseCache(tmp_path / "ref.sqlite"))
        flaky = {"a": FaultServer(teacher=inner["a"]), "b": FaultServer(["ok", "ok", "ok", "nan"], teacher=inner["b"])}
        cache = ResponseCache(tmp_path / "c.sqlite")
        with pytest.raises(TeacherError, match="'b'.*non-finite"):
            run(flaky, cache)
        first = {n: [row.tobytes() for r in s.seen if r["valid"] for row in r["x"]] for n, s in flaky.items()}
        assert len(first["b"]) == 12 and cache.count("b") == 12 and cache.count("a") == 16
        seen = {n: len(s.seen) for n, s in flaky.items()}
        again = run(flaky, cache)
        for n, s in flaky.items():
            later = [row.tobytes() for r in s.seen[seen[n]:] if r["valid"] for row in r["x"]]
            assert not set(later) & set(first[n])  # nothing paid twice
        assert len(later) == 4 and cache.count() == 32
        for s in (*clean.values(), *flaky.values()):
            s.close()
    assert again.verdict.to_dict() == reference.verdict.to_dict() and again.probes.sha256 == reference.probes.sha256


# --------------------------------------------------------------------- processes and the cache


# Child processes run the benchmark's cache writer with `python -c`, importing only what it uses.
WRITER = "import sys; from pathlib import Path; from benchmarks.reliability import cache_writer; " \
         "cache_writer(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]))"


def test_a_writer_killed_mid_transaction_corrupts_nothing_and_loses_nothing(tmp_path):
    """Three writers share one cache with overlapping probes (two child processes and this one);
    a child is SIGKILLed while writing. The cache passes integrity_check, holds every answer any
    writer got back, and every stored row is the teacher's answer for its probe."""
    import subprocess
    import sys
    import threading

    path = str(tmp_path / "shared.sqlite")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(s), str(tmp_path / f"log{s}"), "2.0"],
                              cwd=str(Path(__file__).parents[1])) for s in range(2)]
    deadline = time.monotonic() + 60
    while not (tmp_path / "log0").exists() or (tmp_path / "log0").stat().st_size == 0:  # writing has begun
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.02)
    me = threading.Thread(target=cache_writer, args=(Path(path), 2, tmp_path / "log2", 1.0))
    me.start()
    time.sleep(random.Random(0).uniform(0.1, 0.4))
    procs[0].kill()
    me.join()
    codes = [p.wait(120) for p in procs]
    assert codes == [-signal.SIGKILL, 0]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = dict(conn.execute("SELECT key, vals FROM responses").fetchall())
    conn.close()
    logged = {line for s in range(3) for line in (tmp_path / f"log{s}").read_text().split("\n") if len(line) == 64}
    assert logged and logged <= set(rows)
    teacher, pool = writer_task()
    truth = {probe_key("lin", "logits", p): v for p, v in zip(pool, teacher.query(pool).values)}
    assert set(rows) <= set(truth)
    for k, v in rows.items():
        np.testing.assert_allclose(np.frombuffer(v, np.float32), truth[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ SIGKILL (slow)


@pytest.fixture(scope="module")
def fleet(toy_zoo, tmp_path_factory):
    from benchmarks.reliability import Fleet

    f = Fleet(tmp_path_factory.mktemp("fleet"), zoo=toy_zoo["root"])
    yield f
    f.close()


@pytest.mark.slow  # three `kdd` subprocesses per command: ~1 min on 2 cores
@pytest.mark.parametrize("command", ["detect", "audit"])
def test_sigkill_then_rerun_repeats_no_query_and_keeps_the_verdict(fleet, command, tmp_path):
    """`kdd detect` / `kdd audit` SIGKILLed just after a teacher answered a request (the window
    between the answer and the cache write), then run again: nothing cached before the kill is
    asked again or lost, the cache is intact, the verdict is the uninterrupted run's."""
    from benchmarks.reliability import cli_env, kill_reference, kill_trial

    env = cli_env(tmp_path)
    ref = kill_reference(fleet, command, tmp_path, env, runs=1)
    t = kill_trial(fleet, command, tmp_path / "run", env, ref, "request-after", random.Random(3))
    assert t["exit"] == -signal.SIGKILL and t["answered_before_kill"] > 0, t
    assert t["integrity_at_kill"] == "ok" and t["integrity_after"] == "ok"
    assert t["rerun_exit"] == 0, t["rerun_stderr"]
    assert t["repeated"] == 0 and t["lost"] == 0 and t["duplicates"] == 0 and t["cache_matches_reference"]
    assert t["verdict"] in ("identical", "within_tolerance")
