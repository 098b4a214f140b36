"""HTTP teachers (Open Inference Protocol v2) and `kdd serve`, over loopback only.

HttpTeacher against kdd serve answers what the in-process teacher answers; the response cache
in front makes a re-run free; a fault-injecting server checks retries, Retry-After, timeouts,
dropped and truncated transfers, and that wrong answers raise TeacherError and are never cached;
the bearer token is sent and never leaks into errors; the server refuses bad requests."""

from __future__ import annotations

import http.client
import json
import time

import numpy as np
import pytest

from kdd_jax.config import ConfigError, parse_config
from kdd_jax.models import build_model
from kdd_jax.teachers import (
    CachedTeacher,
    HttpTeacher,
    InputSpec,
    ResponseCache,
    TeacherError,
    flax_teacher,
)
from kdd_jax.teachers.config import load_teachers_file, open_teacher
from kdd_jax.teachers.server import serve_in_thread
from tests.fault_server import LIN, FaultServer

TINY = {"format_version": 1, "family": "vgg",
        "arch": {"cfg": [4, "M"], "num_classes": 7, "in_channels": 1, "avgpool": None, "classifier_hidden": [],
                 "dropout": "none"},
        "preprocessing": {"input_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25]}}
TOKEN = "s3cr3t-Token-value-42"


@pytest.fixture(scope="module")
def tiny():
    cfg = parse_config(TINY)
    return build_model(cfg, seed=0), cfg


@pytest.fixture
def serve(tiny):
    servers = []

    def start(**kw):
        kw.setdefault("name", "tiny")
        server, url = serve_in_thread(*tiny, **kw)
        servers.append(server)
        return server, url

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def images(n, seed=0, shape=(1, 8, 8)):
    return np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)


def http_teacher(url, output="logits", k=3, **kw):
    kw.setdefault("model", "tiny")
    return HttpTeacher("tiny", url, num_classes=7, spec=InputSpec((8, 8), 1), output=output, k=k, **kw)


def fields(out):
    return {f: getattr(out, f) for f in ("values", "indices") if getattr(out, f) is not None}


@pytest.mark.parametrize("kind", ["logits", "probs", "topk", "labels"])
def test_http_teacher_against_kdd_serve_equals_in_process_teacher(tiny, serve, kind):
    server, url = serve(output=kind, k=3)
    direct = flax_teacher("tiny", *tiny, output=kind, k=3).query(images(12))
    remote = http_teacher(url, kind).query(images(12))
    assert remote.kind == kind and server.stats["infer_requests"] == 1 and server.stats["rows"] == 12
    assert fields(remote).keys() == fields(direct).keys()
    for f, v in fields(direct).items():
        np.testing.assert_array_equal(getattr(remote, f), v)
        assert getattr(remote, f).dtype == v.dtype


def test_batching_through_kdd_serve(tiny, serve):
    server, url = serve(output="probs")
    t = http_teacher(url, "probs", batch_size=4, concurrency=3)
    out = t.query(images(18))
    assert server.stats["infer_requests"] == 5 and t.requests == 5  # 4+4+4+4+2
    np.testing.assert_allclose(out.values, flax_teacher("tiny", *tiny, output="probs").query(images(18)).values,
                               rtol=1e-5, atol=1e-6)


def test_cached_http_teacher_rerun_makes_zero_requests(serve, tmp_path):
    server, url = serve(output="topk", k=3)
    x = images(10, seed=1)
    first = CachedTeacher(http_teacher(url, "topk", batch_size=4), ResponseCache(tmp_path / "c.sqlite"))
    a = first.query(x)
    sent = server.stats["infer_requests"]
    assert sent == 3 and first.stats.queries == 10
    again = CachedTeacher(http_teacher(url, "topk"), ResponseCache(tmp_path / "c.sqlite"))
    b = again.query(x)
    assert server.stats["infer_requests"] == sent and again.stats.queries == 0 and again.stats.hits == 10
    for f, v in fields(a).items():
        np.testing.assert_array_equal(getattr(b, f), v)


# -- a fault-injecting OIP server (tests/fault_server.py) ------------------------------------------


@pytest.fixture
def fault():
    made = []

    def make(*script):
        s = FaultServer(script)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def lin_http(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return HttpTeacher("lin-remote", url, model="lin", num_classes=5, spec=InputSpec((4, 4), 1), output="logits", **kw)


def small(n=6, seed=0):
    return images(n, seed, shape=(1, 4, 4))


@pytest.mark.parametrize("script", [["500"], ["500", "500"], ["drop"], ["truncate"], ["slow"], ["loris"], ["lorisbody"],
                                    ["drop", "500", "truncate"]])
def test_transient_failures_are_retried(fault, script):
    s = fault(*script)
    t = lin_http(s.url, timeout_s=0.3, max_retries=3)
    out = t.query(small())
    np.testing.assert_array_equal(out.values, LIN.query(small()).values)
    assert [r["action"] for r in s.seen] == [*script, "ok"] and t.retries == len(script)
    assert s.seen[0]["path"] == "/v2/models/lin/infer"


def test_slow_loris_is_cut_off_at_the_request_deadline(fault):
    """timeout_s bounds the whole request: a server trickling its answer a byte at a time (each
    read well within the socket timeout) is abandoned at the deadline and the request retried."""
    s = fault("loris", "lorisbody")
    t = lin_http(s.url, timeout_s=0.4, max_retries=2)
    start = time.monotonic()
    out = t.query(small())
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(out.values, LIN.query(small()).values)
    assert [r["action"] for r in s.seen] == ["loris", "lorisbody", "ok"] and t.retries == 2
    assert elapsed < 2.0, elapsed  # two deadlines of 0.4 s plus backoff; the trickle alone lasts 5 s each


def test_latency_spike_below_the_timeout_is_waited_for(fault):
    s = fault("spike:0.3")
    t = lin_http(s.url, timeout_s=2.0)
    np.testing.assert_array_equal(t.query(small()).values, LIN.query(small()).values)
    assert [r["action"] for r in s.seen] == ["spike:0.3"] and t.retries == 0


def test_retry_after_is_honoured(fault):
    s = fault("429:1")
    t = lin_http(s.url)
    start = time.monotonic()
    t.query(small())
    elapsed = time.monotonic() - start
    assert elapsed >= 1.0, elapsed
    assert [r["action"] for r in s.seen] == ["429:1", "ok"]


def test_gives_up_after_max_retries_naming_teacher_and_last_error(fault):
    s = fault("500", "500", "500", "500")
    t = lin_http(s.url, max_retries=2)
    with pytest.raises(TeacherError) as e:
        t.query(small())
    assert "'lin-remote'" in str(e.value) and "HTTP 500" in str(e.value) and "3 attempt" in str(e.value)
    assert len(s.seen) == 3


def test_connection_refused_is_retried_then_fails(fault):
    s = fault()
    url = s.url
    s.close()  # nothing listens there any more
    t = lin_http(url, max_retries=1)
    with pytest.raises(TeacherError, match="lin-remote.*connection error"):
        t.query(small())
    assert t.requests == 2


@pytest.mark.parametrize("action, message", [("badjson", "not valid JSON"), ("nan", "non-finite"), ("inf", "non-finite"),
                                             ("wrongshape", "shape"), ("wrongbatch", "shape"),
                                             ("huge", "declares Content-Length [0-9]+, more than the [0-9]+ bytes"),
                                             ("hugedeclared", "declares Content-Length 1000000000000"),
                                             ("hugechunked", "runs past the bound")])
def test_wrong_answers_raise_and_are_never_cached(fault, tmp_path, action, message):
    s = fault(action)
    cache = ResponseCache(tmp_path / "c.sqlite")
    cached = CachedTeacher(lin_http(s.url, max_retries=3), cache)
    with pytest.raises(TeacherError, match=message) as e:
        cached.query(small())
    assert "'lin-remote'" in str(e.value)
    assert len(s.seen) == 1  # a wrong answer is not retried
    assert cache.count() == 0  # and nothing of it was stored
    out = cached.query(small())  # the server behaves now
    np.testing.assert_array_equal(out.values, LIN.query(small()).values)
    assert cache.count() == 6


def test_answer_bound_follows_what_was_asked(fault):
    """The bound scales with the values asked for (a big batch of a wide answer is not refused), and
    an answer near a small request's bound but within it is read."""
    from kdd_jax.teachers.http import ANSWER_BYTES_PER_VALUE, ANSWER_SLACK_BYTES, answer_cap

    assert answer_cap(0) == ANSWER_SLACK_BYTES
    assert answer_cap(1000 * 1000) == ANSWER_BYTES_PER_VALUE * 10**6 + ANSWER_SLACK_BYTES
    s = fault("ok")
    out = lin_http(s.url, batch_size=64).query(small(64))  # 64 x 5 values: far below the bound
    np.testing.assert_array_equal(out.values, LIN.query(small(64)).values)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_answers_received_before_a_failure_are_kept(fault, tmp_path, concurrency):
    """Each HTTP batch is stored as soon as it is validated: when a later batch of the same query
    fails, the answers already paid for are in the cache, and the re-run asks only for the rest."""
    s = fault("ok", "ok", "badjson")
    cache = ResponseCache(tmp_path / "c.sqlite")
    cached = CachedTeacher(lin_http(s.url, batch_size=4, concurrency=concurrency), cache)
    with pytest.raises(TeacherError, match="not valid JSON"):
        cached.query(small(12))
    assert cache.count() == 8 and cached.stats.queries == 8
    out = cached.query(small(12))
    np.testing.assert_array_equal(out.values, LIN.query(small(12)).values)
    assert sum(r["n"] for r in s.seen if r["action"] == "ok") == 12  # no probe answered twice
    assert cache.count() == 12 and cached.stats.queries == 12


def test_client_side_batching_concurrency_is_bounded(fault):
    s = fault()
    s.delay = 0.15
    t = lin_http(s.url, batch_size=2, concurrency=3)
    out = t.query(small(14))
    np.testing.assert_array_equal(out.values, LIN.query(small(14)).values)
    assert len(s.seen) == 7 and sorted(r["n"] for r in s.seen) == [2] * 7
    assert 2 <= s.peak <= 3, s.peak


def test_token_is_sent_and_never_leaks(fault, monkeypatch):
    monkeypatch.setenv("KDD_TEST_TOKEN", TOKEN)
    s = fault("500", "echo500", "echo500")
    t = lin_http(s.url, max_retries=2, token_env="KDD_TEST_TOKEN")
    with pytest.raises(TeacherError) as e:
        t.query(small())
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in s.seen) and len(s.seen) == 3
    text = str(e.value) + repr(e.value) + repr(t) + str(vars(t))
    assert TOKEN not in text and "redacted" in str(e.value)
    monkeypatch.delenv("KDD_TEST_TOKEN")
    with pytest.raises(TeacherError, match="KDD_TEST_TOKEN.*not set"):
        t.query(small())


def test_kdd_serve_token_check(serve, monkeypatch):
    server, url = serve(output="logits", token=TOKEN)
    assert raw(url, "GET", "/v2/health/ready")[0] == 200  # health probes need no token
    assert raw(url, "GET", "/v2/models/tiny")[0] == 401
    assert raw(url, "GET", "/v2/models/tiny", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    monkeypatch.setenv("KDD_TEST_TOKEN", "wrong-" + TOKEN)
    with pytest.raises(TeacherError, match="HTTP 401") as e:
        http_teacher(url, token_env="KDD_TEST_TOKEN").query(images(2))
    assert TOKEN not in str(e.value)
    with pytest.raises(TeacherError, match="HTTP 401"):
        http_teacher(url).query(images(2))
    monkeypatch.setenv("KDD_TEST_TOKEN", TOKEN)
    assert len(http_teacher(url, token_env="KDD_TEST_TOKEN").query(images(2))) == 2
    assert server.stats["rows"] == 2


# -- kdd serve refuses what it should -----------------------------------------------------------

def raw(url, method, path, body=None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def infer_body(shape=(2, 1, 8, 8), datatype="FP32", data=None):
    if data is None:
        data = images(shape[0]).ravel().tolist() if shape == (2, 1, 8, 8) else [0.5] * int(np.prod(shape))
    return json.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype, "data": data}]})


def test_kdd_serve_endpoints_and_rejections(serve):
    server, url = serve(output="probs", max_request_bytes=20_000)
    assert server.server_address[0] == "127.0.0.1"
    assert raw(url, "GET", "/v2/health/ready")[0] == 200
    status, meta = raw(url, "GET", "/v2/models/tiny")
    assert status == 200 and meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 7]}]
    status, ok = raw(url, "POST", "/v2/models/tiny/infer", infer_body())
    assert status == 200 and ok["outputs"][0]["shape"] == [2, 7]
    bad = [
        ("POST", "/v2/models/tiny/infer", "x" * 30_000, 413),
        ("POST", "/v2/models/tiny/infer", '{"inputs": [', 400),
        ("POST", "/v2/models/tiny/infer", "[]", 400),
        ("POST", "/v2/models/tiny/infer", infer_body(shape=(2, 3, 8, 8)), 400),
        ("POST", "/v2/models/tiny/infer", infer_body(shape=(0, 1, 8, 8)), 400),
        ("POST", "/v2/models/tiny/infer", infer_body(datatype="INT32"), 400),
        ("POST", "/v2/models/tiny/infer", infer_body(data=[0.5] * 100), 400),
        ("POST", "/v2/models/tiny/infer", infer_body(data=["a"] * 128), 400),
        ("POST", "/v2/models/tiny/infer", infer_body(data=[float("nan")] + [0.5] * 127), 400),
        ("POST", "/v2/models/tiny/infer", infer_body(data=[1e39] + [0.5] * 127), 400),
        ("POST", "/v2/models/other/infer", infer_body(), 404),
        ("GET", "/v2/models/other", None, 404),
        ("GET", "/nowhere", None, 404),
    ]
    for method, path, body, want in bad:
        status, doc = raw(url, method, path, body, {"Content-Type": "application/json"})
        assert status == want, (path, str(body)[:60], status, doc)
        assert isinstance(doc["error"], str) and doc["error"]
    assert server.stats["rows"] == 2  # nothing bad reached the model


def _trickle(url, prefix: bytes, trickled: bytes, byte_s: float = 0.05, give_up_s: float = 5.0) -> tuple[float, bytes]:
    """Send `prefix` at once, then `trickled` a byte every `byte_s` seconds (for at most `give_up_s`);
    (seconds until the server closed the connection, what it sent back)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(prefix)
            for i in range(len(trickled)):
                if time.monotonic() - t0 > give_up_s:
                    break
                sock.sendall(trickled[i : i + 1])
                time.sleep(byte_s)
            while chunk := sock.recv(1 << 16):
                got += chunk
        except OSError:  # reset: the server shut the connection while we were still sending
            pass
    return time.monotonic() - t0, got


@pytest.mark.parametrize("where", ["headers", "body"])
def test_kdd_serve_cuts_off_a_trickling_client(serve, where):
    """Each byte arrives well within the per-read timeout, but the request as a whole does not: the
    server closes the connection at read_timeout_s instead of holding a thread; others are served."""
    server, url = serve(read_timeout_s=0.6)
    body = infer_body().encode()
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    elapsed, got = _trickle(url, b"", head + body) if where == "headers" else _trickle(url, head, body)
    assert b"200 OK" not in got  # never answered
    assert elapsed < 4  # cut near 0.6 s, not after the trickle (5 s here, minutes for the whole request)
    assert server.stats["read_timeouts"] >= 1 and server.stats["rows"] == 0
    status, doc = raw(url, "POST", "/v2/models/tiny/infer", infer_body(), {"Content-Type": "application/json"})
    assert status == 200 and len(doc["outputs"][0]["data"]) > 0


def test_kdd_serve_read_deadline_does_not_cover_inference():
    """A slow model answers after read_timeout_s: the deadline stops once the request is read."""
    import time

    from kdd_jax.teachers import CallableTeacher

    def slow(x):
        time.sleep(0.8)
        return x.reshape(len(x), -1)[:, :3]

    teacher = CallableTeacher("slow", slow, num_classes=3, spec=InputSpec((4, 4), 1))
    server, url = serve_in_thread(None, None, name="slow", teacher=teacher, read_timeout_s=0.3)
    try:
        t = HttpTeacher("slow", url, num_classes=3, spec=InputSpec((4, 4), 1), output="logits", timeout_s=10,
                        max_retries=0)
        out = t.query(small(2))
        np.testing.assert_allclose(out.values, small(2).reshape(2, -1)[:, :3])
        assert server.stats["rows"] == 2 and t.requests == 1
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 1e12])
def test_kdd_serve_refuses_a_read_timeout_it_cannot_use(tiny, bad):
    from kdd_jax.teachers.server import make_server
    from kdd_jax.teachers.local import flax_teacher

    with pytest.raises(ValueError, match="read_timeout_s"):
        make_server(flax_teacher("tiny", *tiny), read_timeout_s=bad)


def test_kdd_serve_idle_time_before_a_request_is_not_held_against_it(serve):
    """A connection may idle (up to read_timeout_s) before its request; the request's own deadline
    starts at its first byte. Here: 0.45 s idle, then a request trickled over ~0.5 s, 0.95 s in all
    against a 0.6 s read timeout: answered."""
    import socket

    server, url = serve(read_timeout_s=0.6)
    body = infer_body().encode()
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        time.sleep(0.45)
        chunks = [head + body[: len(body) // 2], body[len(body) // 2 :]]
        for c in chunks:
            sock.sendall(c)
            time.sleep(0.25)
        got = b""
        while chunk := sock.recv(1 << 16):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert server.stats["read_timeouts"] == 0 and server.stats["rows"] == 2


def test_deadline_cancel_and_fire_agree():
    """cancel() says whether the deadline fired, decided atomically with the timer: a deadline
    cancelled in time never shuts its sockets afterwards."""
    from kdd_jax.teachers.http import Deadline

    d = Deadline(0.05)
    time.sleep(0.3)
    assert d.cancel() is True and d.fired
    d = Deadline(30)
    assert d.cancel() is False
    d._fire()  # a timer thread that was already running when cancel() won
    assert not d.fired


def test_kdd_serve_cli_parser_binds_loopback_by_default():
    from kdd_jax.cli import build_parser

    args = build_parser().parse_args(["serve", "some/dir", "--port", "0"])
    assert args.host == "127.0.0.1" and args.output == "logits" and args.max_request_mb == 64


def test_kdd_serve_cli_refuses_unset_token_env(tmp_path, monkeypatch, capsys):
    from kdd_jax.cli import main

    monkeypatch.delenv("KDD_NO_SUCH_TOKEN", raising=False)
    assert main(["serve", str(tmp_path), "--port", "0", "--token-env", "KDD_NO_SUCH_TOKEN"]) == 2
    assert "KDD_NO_SUCH_TOKEN" in capsys.readouterr().err


# -- the teachers file and kdd detect -----------------------------------------------------------

def test_teachers_file_http_entries(tmp_path):
    f = tmp_path / "t.json"
    entry = {"name": "remote", "kind": "http", "url": "http://127.0.0.1:9", "model": "m", "output": "topk", "k": 3,
             "input_size": [8, 8], "channels": 1, "value_range": [0, 255], "num_classes": 7, "timeout_s": 2,
             "max_retries": 1, "batch_size": 16, "concurrency": 2, "token_env": "SOME_VAR"}
    f.write_text(json.dumps({"teachers": [entry]}))
    (e,) = load_teachers_file(f)
    t = open_teacher(e)
    assert isinstance(t, HttpTeacher) and t.infer_url == "http://127.0.0.1:9/v2/models/m/infer"
    assert (t.output, t.k, t.num_classes, t.spec, t.batch_size, t.concurrency, t.max_retries, t.token_env) == (
        "topk", 3, 7, InputSpec((8, 8), 1, (0.0, 255.0)), 16, 2, 1, "SOME_VAR")
    for broken, message in [({"url": None}, "url"), ({"url": "ftp://x"}, "http://"), ({"num_classes": None}, "num_classes"),
                            ({"concurrency": 0}, ">= 1"), ({"colour": 1}, "unknown field")]:
        bad = {k: v for k, v in {**entry, **broken}.items() if v is not None}
        f.write_text(json.dumps({"teachers": [bad]}))
        with pytest.raises(ConfigError, match=message):
            load_teachers_file(f)
    f.write_text(json.dumps({"teachers": [{"name": "x", "kind": "local"}]}))
    with pytest.raises(ConfigError, match="path"):
        load_teachers_file(f)


def test_kdd_detect_with_http_teacher(serve, make_student, tmp_path, capsys):
    from kdd_jax.cli import main

    server, url = serve(output="probs", name="remote-model")
    student = make_student("tiny", config=TINY, dirname="student")
    tfile = tmp_path / "teachers.json"
    tfile.write_text(json.dumps({"teachers": [
        {"name": "remote", "kind": "http", "url": url, "model": "remote-model", "output": "probs", "input_size": [8, 8],
         "channels": 1, "num_classes": 7, "batch_size": 5, "concurrency": 2}]}))
    argv = ["detect", "--student", str(student), "--teachers", str(tfile), "--probes", "12", "--steps", "2",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert report["teachers"]["remote"]["queries"] == 12 and report["teachers"]["remote"]["output"] == "probs"
    assert server.stats["rows"] == 12 and server.stats["infer_requests"] == 3
    assert report["verdict"]["teachers"] == ["remote"] and report["verdict"]["winner"] == "remote"
    # the answers are in the response cache: asking the same probes again sends nothing
    cache = ResponseCache(tmp_path / "cache" / "responses.sqlite")
    assert cache.count("remote") == 12


def test_tritonclient_against_kdd_serve(tiny, serve):
    httpclient = pytest.importorskip("tritonclient.http")
    server, url = serve(output="logits")
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        x = images(3)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        res = client.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)])
        np.testing.assert_array_equal(res.as_numpy("logits"), flax_teacher("tiny", *tiny).query(x).values)
    finally:
        client.close()
