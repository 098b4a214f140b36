"""HttpTeacher against an INDEPENDENT Open Inference Protocol v2 server: KServe's ModelServer.

The other HTTP tests talk to `kdd serve` or to a hand-written fault server, i.e. to our own reading
of the protocol. Here the server is kserve's (FastAPI + uvicorn + pydantic request/response models),
run in a subprocess on 127.0.0.1, REST only (gRPC off), serving custom `kserve.Model`s:

  "lin"     answers every output kind at once, each output named as our client expects:
            logits FP32 [n, C], probs FP32 [n, C], topk_indices INT64 [n, k], topk_probs FP32 [n, k],
            labels INT64 [n] (INT64: what numpy integer arrays become in kserve);
  "single"  answers one output named "output0" (kserve's usual naming) holding the logits.

The logits are an exact linear map: inputs are multiples of 2**-8 in [0, 1], weights multiples of
2**-4 in [-0.5, 0.5], so every partial sum is a multiple of 2**-12 below 2**5 and float32 holds it
exactly: the same bits whatever the summation order or batch split, and our answers must EQUAL
the numpy reference. Each predict appends "<model> <rows>" to a log file, so the
tests count what reached the server from the server's side.

Skipped where kserve is not installed (a large install: about 330 MB, 60 packages).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("kserve")

from kdd_jax.teachers import CachedTeacher, HttpTeacher, ResponseCache, TeacherError  # noqa: E402
from kdd_jax.teachers.config import load_teachers_file, open_teacher  # noqa: E402

C, H, W, NUM_CLASSES, K = 3, 4, 4, 10, 3
STARTUP_TIMEOUT_S = 90.0

SERVER = textwrap.dedent('''
    """A kserve ModelServer for tests/test_http_kserve.py: REST v2 on 127.0.0.1 only, no gRPC."""
    import os
    import sys

    import numpy as np
    import kserve
    from kserve import InferOutput, InferResponse
    from kserve.errors import InvalidInput
    from kserve.protocol.rest import server as rest_server

    # kserve 0.21 hard-codes host="0.0.0.0" in RESTServer; a test binds loopback only.
    _init = rest_server.RESTServer.__init__

    def _loopback_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.config.host = "127.0.0.1"

    rest_server.RESTServer.__init__ = _loopback_init

    WORK = os.environ["KDD_KSERVE_DIR"]
    W = np.load(os.path.join(WORK, "w.npy"))
    B = np.load(os.path.join(WORK, "b.npy"))
    SHAPE = [int(s) for s in os.environ["KDD_KSERVE_SHAPE"].split(",")]
    K = int(os.environ["KDD_KSERVE_K"])
    LOG = os.path.join(WORK, "requests.log")


    def output(name, array):
        o = InferOutput(name=name, shape=list(array.shape), datatype={"f": "FP32", "i": "INT64"}[array.dtype.kind])
        o.set_data_from_numpy(array, binary_data=False)
        return o


    class Linear(kserve.Model):
        def __init__(self, name, kinds):
            super().__init__(name)
            self.kinds = kinds
            self.load()

        def load(self):
            self.ready = True
            return self.ready

        def predict(self, payload, headers=None, response_headers=None):
            if len(payload.inputs) != 1:
                raise InvalidInput(f"expected one input, got {len(payload.inputs)}")
            inp = payload.inputs[0]
            if inp.name != "input" or inp.datatype != "FP32":
                raise InvalidInput(f"expected an FP32 tensor named input, got {inp.datatype} {inp.name!r}")
            if len(inp.shape) != 4 or list(inp.shape[1:]) != SHAPE:
                raise InvalidInput(f"input shape {inp.shape}, expected [n, {', '.join(map(str, SHAPE))}]")
            x = inp.as_numpy()
            logits = (x.reshape(len(x), -1) @ W + B).astype(np.float32)
            z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
            probs = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).astype(np.float32)
            top = np.argsort(-logits, axis=-1, kind="stable")[:, :K]  # from the exact logits
            answers = {"logits": logits, "probs": probs, "topk_indices": top.astype(np.int64),
                       "topk_probs": np.take_along_axis(probs, top, -1), "labels": logits.argmax(-1).astype(np.int64),
                       "output0": logits}
            with open(LOG, "a") as f:
                f.write(f"{self.name} {len(x)}\\n")
            return InferResponse(response_id=payload.id or "0", model_name=self.name,
                                 infer_outputs=[output(k, answers[k]) for k in self.kinds])


    if __name__ == "__main__":
        models = [Linear("lin", ["logits", "probs", "topk_indices", "topk_probs", "labels"]),
                  Linear("single", ["output0"])]
        kserve.ModelServer(http_port=int(os.environ["KDD_KSERVE_PORT"]), enable_grpc=False, workers=1,
                           grace_period=2, enable_latency_logging=False).start(models)
''')


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """What the served model must answer, in numpy, per output kind."""
    logits = (x.reshape(len(x), -1) @ WEIGHTS + BIAS).astype(np.float32)
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    probs = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).astype(np.float32)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
    return {"logits": logits, "probs": probs, "topk": (top, np.take_along_axis(probs, top, -1)),
            "labels": logits.argmax(-1)}


_rng = np.random.default_rng(2025)
WEIGHTS = (_rng.integers(-8, 9, size=(C * H * W, NUM_CLASSES)) / 16).astype(np.float32)  # multiples of 2**-4
BIAS = (_rng.integers(-4, 5, size=NUM_CLASSES) / 8).astype(np.float32)


def probes(n: int, seed: int = 0) -> np.ndarray:
    """Pixels k/256 in [0, 1]: exact in float32, so the linear map is exact too."""
    return (np.random.default_rng(seed).integers(0, 257, size=(n, C, H, W)) / 256).astype(np.float32)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class KServe:
    """A kserve ModelServer subprocess running SERVER; its output goes to server-<attempt>.out."""

    def __init__(self, workdir):
        self.dir = workdir
        self.log = workdir / "requests.log"
        self.proc = None
        self.url = ""

    def start(self) -> None:
        np.save(self.dir / "w.npy", WEIGHTS)
        np.save(self.dir / "b.npy", BIAS)
        script = self.dir / "kserve_server.py"
        script.write_text(SERVER)
        for attempt in range(3):  # a free port can be taken between our probe and the server's bind
            port = _free_port()
            env = {**os.environ, "KDD_KSERVE_DIR": str(self.dir), "KDD_KSERVE_PORT": str(port),
                   "KDD_KSERVE_SHAPE": f"{C},{H},{W}", "KDD_KSERVE_K": str(K),
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            out = open(self.dir / f"server-{attempt}.out", "wb")
            self.proc = subprocess.Popen([sys.executable, str(script)], cwd=self.dir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            out.close()
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if _get(f"{self.url}/v2/health/ready") == 200 and _get(f"{self.url}/v2/models/lin/ready") == 200:
                        return
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.2)
            tail = (self.dir / f"server-{attempt}.out").read_text(errors="replace")[-3000:]
            self.stop()
            if "address already in use" not in tail.lower():
                raise RuntimeError(f"kserve ModelServer did not become ready at {self.url}:\n{tail}")
        raise RuntimeError("kserve ModelServer: no free port after 3 tries")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def requests(self) -> list[tuple[str, int]]:
        """(model, rows) of every predict the server ran so far."""
        if not self.log.exists():
            return []
        return [(m, int(n)) for m, n in (line.split() for line in self.log.read_text().splitlines())]


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory):
    server = KServe(tmp_path_factory.mktemp("kserve"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def teacher_from_file(tmp_path, url, **entry) -> HttpTeacher:
    """An HttpTeacher built the way a user builds one: a kind-http entry of a teachers file."""
    full = {"name": "kserve-lin", "kind": "http", "url": url, "model": "lin", "output": "logits", "k": K,
            "input_size": [H, W], "channels": C, "value_range": [0, 1], "num_classes": NUM_CLASSES,
            "timeout_s": 15, "max_retries": 1, "batch_size": 64, "concurrency": 2, **entry}
    path = tmp_path / f"teachers-{full['name']}.json"
    path.write_text(json.dumps({"teachers": [full]}))
    (e,) = load_teachers_file(path)
    teacher = open_teacher(e)
    assert isinstance(teacher, HttpTeacher)
    return teacher


def _listen_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp[6]) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                found.append(addr)
    return found


def test_kserve_binds_loopback_and_serves_v2_metadata(kserve_server):
    with urllib.request.urlopen(f"{kserve_server.url}/v2/models/lin", timeout=5) as r:
        meta = json.loads(r.read())
    assert meta["name"] == "lin"
    if os.path.exists("/proc/net/tcp"):
        assert _listen_addresses(int(kserve_server.url.rsplit(":", 1)[1])) == ["0100007F"]  # 127.0.0.1 only


@pytest.mark.parametrize("kind", ["logits", "probs", "topk", "labels"])
def test_http_teacher_against_kserve_equals_numpy_reference(kserve_server, tmp_path, kind):
    x = probes(9, seed=1)
    teacher = teacher_from_file(tmp_path, kserve_server.url, output=kind)
    before = len(kserve_server.requests())
    out = teacher.query(x)
    assert out.kind == kind and len(out) == 9 and teacher.requests == 1 and teacher.retries == 0
    assert kserve_server.requests()[before:] == [("lin", 9)]
    want = reference(x)[kind]
    if kind == "logits":
        np.testing.assert_array_equal(out.values, want)  # exact: see the module docstring
        assert out.values.dtype == np.float32
    elif kind == "probs":
        np.testing.assert_allclose(out.values, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out.values.sum(-1), 1.0, atol=1e-5)
    elif kind == "topk":
        np.testing.assert_array_equal(out.indices, want[0])
        np.testing.assert_allclose(out.values, want[1], rtol=1e-6, atol=1e-7)
        assert out.indices.dtype == np.int32 and out.indices.shape == (9, K)
    else:
        np.testing.assert_array_equal(out.indices, want)
        assert out.indices.dtype == np.int32


def test_single_unnamed_output_is_taken(kserve_server, tmp_path):
    x = probes(5, seed=2)
    teacher = teacher_from_file(tmp_path, kserve_server.url, name="kserve-single", model="single", output="logits")
    np.testing.assert_array_equal(teacher.query(x).values, reference(x)["logits"])


def test_batching_against_kserve(kserve_server, tmp_path):
    x = probes(10, seed=3)
    teacher = teacher_from_file(tmp_path, kserve_server.url, batch_size=4, concurrency=2)
    before = len(kserve_server.requests())
    out = teacher.query(x)
    seen = kserve_server.requests()[before:]
    assert teacher.requests == 3 and sorted(seen) == [("lin", 2), ("lin", 4), ("lin", 4)]
    np.testing.assert_array_equal(out.values, reference(x)["logits"])  # in probe order


def test_unknown_model_is_a_clear_teacher_error(kserve_server, tmp_path):
    teacher = teacher_from_file(tmp_path, kserve_server.url, name="kserve-missing", model="no-such-model")
    before = len(kserve_server.requests())
    with pytest.raises(TeacherError) as e:
        teacher.query(probes(2))
    msg = str(e.value)
    assert "'kserve-missing'" in msg and "HTTP 404" in msg and "no-such-model" in msg, msg
    assert teacher.requests == 1  # a 404 is not retried
    assert kserve_server.requests()[before:] == []


def test_kserve_rejection_is_a_clear_teacher_error(kserve_server, tmp_path):
    # the entry says 1 channel, the model takes 3: kserve's InvalidInput comes back as HTTP 400
    teacher = teacher_from_file(tmp_path, kserve_server.url, name="kserve-wrong-shape", channels=1)
    with pytest.raises(TeacherError) as e:
        teacher.query(np.zeros((2, 1, H, W), np.float32))
    msg = str(e.value)
    assert "'kserve-wrong-shape'" in msg and "HTTP 400" in msg and "input shape" in msg, msg
    assert teacher.requests == 1


def test_cached_kserve_teacher_rerun_sends_zero_queries(kserve_server, tmp_path):
    x = probes(10, seed=4)
    before = len(kserve_server.requests())
    first_teacher = teacher_from_file(tmp_path, kserve_server.url, output="topk", batch_size=4)
    first = CachedTeacher(first_teacher, ResponseCache(tmp_path / "responses.sqlite"))
    a = first.query(x)
    sent = kserve_server.requests()[before:]
    assert first.stats.queries == 10 and sorted(n for _, n in sent) == [2, 4, 4]
    again_teacher = teacher_from_file(tmp_path, kserve_server.url, output="topk", batch_size=4)
    again = CachedTeacher(again_teacher, ResponseCache(tmp_path / "responses.sqlite"))
    b = again.query(x)
    assert again.stats.queries == 0 and again.stats.hits == 10 and again_teacher.requests == 0
    assert kserve_server.requests()[before:] == sent  # the server saw nothing new
    np.testing.assert_array_equal(b.indices, a.indices)
    np.testing.assert_array_equal(b.values, a.values)
    np.testing.assert_array_equal(a.indices, reference(x)["topk"][0])
