"""A fault-injecting Open Inference Protocol v2 server on loopback, shared by the HTTP teacher
tests (tests/test_http_teacher.py, tests/test_reliability.py) and benchmarks/reliability.py.

It answers `POST /v2/models/{name}/infer` with whatever `teacher` (anything with `query(x) ->
TeacherOutput`, `output`, `num_classes`) answers, in the OIP JSON layout `kdd serve` uses, except
when an action says otherwise. One action per request: first from `script` (in order), then from
`chooser(server)` if given, else "ok". Every request is logged in `seen` (action, row count, the
input rows, the status sent), so callers can count what was asked and what was answered.

Actions and what the HTTP client (kdd_jax/teachers/http.py) is documented to do with them
(FAULT_KINDS): transient faults are retried, wrong answers are reported (TeacherError, never
cached, not retried), a latency spike below the client's timeout is simply waited for.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from kdd_jax.teachers import CallableTeacher, InputSpec

# fault kind -> the client's documented outcome
FAULT_KINDS: dict[str, str] = {
    "spike": "answered",  # latency spike below the client's timeout: answered late, no retry
    "slow": "retried",  # latency above the client's timeout: it gives up and retries
    "500": "retried",
    "429": "retried",  # with Retry-After, honoured
    "drop": "retried",  # connection closed without an answer
    "truncate": "retried",  # fewer body bytes than Content-Length, then closed
    "loris": "retried",  # status line and headers trickled a byte at a time
    "lorisbody": "retried",  # headers at once, body trickled a byte at a time
    "badjson": "reported",  # complete 200 answer that is not valid JSON
    "wrongshape": "reported",  # one class too many
    "nan": "reported",
    "inf": "reported",
    "wrongbatch": "reported",  # one row too few
    "huge": "reported",  # a valid answer padded with HUGE_PAD bytes of whitespace: past the client's bound
    "hugedeclared": "reported",  # Content-Length of a terabyte: refused on the header, unread
    "hugechunked": "reported",  # chunked, no Content-Length, HUGE_PAD bytes before the answer
}
HUGE_PAD = 24 << 20  # larger than any bound the tests' small batches give (kdd_jax.teachers.http.answer_cap)

LIN_W = np.random.default_rng(5).normal(size=(16, 5)).astype(np.float32)
LIN = CallableTeacher("lin", lambda x: x.reshape(len(x), -1) @ LIN_W, num_classes=5, spec=InputSpec((4, 4), 1))


def oip_outputs(out) -> list[dict]:
    """A TeacherOutput as OIP v2 output tensors (the layout of kdd_jax/teachers/server.py)."""
    n = len(out)
    if out.kind in ("logits", "probs"):
        return [{"name": out.kind, "datatype": "FP32", "shape": list(out.values.shape), "data": out.values.ravel().tolist()}]
    if out.kind == "topk":
        return [{"name": "topk_indices", "datatype": "INT32", "shape": list(out.indices.shape),
                 "data": out.indices.ravel().tolist()},
                {"name": "topk_probs", "datatype": "FP32", "shape": list(out.values.shape), "data": out.values.ravel().tolist()}]
    return [{"name": "labels", "datatype": "INT32", "shape": [n], "data": out.indices.ravel().tolist()}]


class FaultServer(ThreadingHTTPServer):
    """Plays `script` in order, one action per request, then `chooser(self)` (else 'ok'):
    ok | 500 | 429:<seconds> | drop | truncate | badjson | nan | inf | wrongshape | wrongbatch |
    slow | spike:<seconds> | loris | lorisbody | echo500 (a hostile 500 echoing the credentials)."""

    daemon_threads = True

    def __init__(self, script=(), *, teacher=LIN, chooser=None, slow_s: float = 0.6, loris_byte_s: float = 0.02,
                 loris_max_s: float = 5.0):
        self.script, self.seen, self.lock = list(script), [], threading.Lock()
        self.teacher, self.chooser = teacher, chooser
        self.slow_s, self.loris_byte_s, self.loris_max_s = slow_s, loris_byte_s, loris_max_s
        self.inflight = self.peak = 0
        self.delay = 0.0
        super().__init__(("127.0.0.1", 0), FaultHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # broken pipes after 'slow' and 'loris' are expected: the client gave up

    def close(self):
        self.shutdown()
        self.server_close()

    def next_action(self) -> str:
        if self.script:
            return self.script.pop(0)
        return self.chooser(self) if self.chooser is not None else "ok"

    def answered(self) -> list[np.ndarray]:
        """The input rows of every request answered with a valid 200 in time ('ok' or a spike)."""
        with self.lock:
            return [row for r in self.seen if r["status"] == 200 and r["valid"] for row in r["x"]]


class FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultServer

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        inp = body["inputs"][0]
        x = np.asarray(inp["data"], np.float32).reshape(inp["shape"])
        with s.lock:
            action = s.next_action()
            entry = {"path": self.path, "auth": self.headers.get("Authorization"), "action": action,
                     "n": int(inp["shape"][0]), "x": x, "status": None, "valid": False}
            s.seen.append(entry)
            s.inflight += 1
            s.peak = max(s.peak, s.inflight)
        try:
            time.sleep(s.delay)
            self.act(action, x, entry)
        finally:
            with s.lock:
                s.inflight -= 1

    def reply(self, entry, status, payload: bytes, headers=(), declared=None, valid=False):
        entry["status"], entry["valid"] = status, valid
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload) if declared is None else declared))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def trickle(self, data: bytes) -> None:
        s = self.server
        stop = time.monotonic() + s.loris_max_s
        for i in range(len(data)):
            if time.monotonic() > stop:
                self.close_connection = True
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(s.loris_byte_s)

    def act(self, action, x, entry):
        s = self.server
        out = s.teacher.query(x)
        tensors = oip_outputs(out)
        good = json.dumps({"model_name": "fault", "outputs": tensors}).encode()
        if action == "ok":
            self.reply(entry, 200, good, valid=True)
        elif action.startswith("spike:"):
            time.sleep(float(action[6:]))
            self.reply(entry, 200, good, valid=True)
        elif action == "slow":
            time.sleep(s.slow_s)
            self.reply(entry, 200, good)  # a valid answer, but sent after the client gave up: not counted as answered
        elif action == "500":
            self.reply(entry, 500, b'{"error": "boom"}')
        elif action == "echo500":  # a hostile server echoing the credentials back
            self.reply(entry, 500, json.dumps({"error": f"bad auth {self.headers.get('Authorization')}"}).encode())
        elif action.startswith("429:"):
            self.reply(entry, 429, b'{"error": "slow down"}', headers=[("Retry-After", action[4:])])
        elif action == "drop":
            self.close_connection = True  # no answer at all
        elif action == "truncate":
            self.reply(entry, 200, good[: len(good) // 2], declared=len(good))
            self.close_connection = True
        elif action == "badjson":
            self.reply(entry, 200, good[: len(good) // 2])
        elif action in ("loris", "lorisbody"):
            entry["status"] = 200
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(good)}\r\n"
                    "\r\n").encode()
            if action == "loris":
                self.trickle(head + good)
            else:
                self.wfile.write(head)
                self.wfile.flush()
                self.trickle(good)
            self.close_connection = True
        elif action == "huge":
            self.reply(entry, 200, good + b" " * HUGE_PAD)
        elif action == "hugedeclared":
            self.reply(entry, 200, good, declared=10**12)
            self.close_connection = True
        elif action == "hugechunked":
            entry["status"] = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b" " * (64 << 10)
            for _ in range(HUGE_PAD // len(chunk)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good))
            self.close_connection = True
        elif action in ("nan", "inf", "wrongshape", "wrongbatch"):
            self.reply(entry, 200, json.dumps({"model_name": "fault", "outputs": self.spoil(action, tensors)}).encode())
        else:
            raise AssertionError(action)

    @staticmethod
    def spoil(action, tensors) -> list[dict]:
        t = dict(tensors[-1])  # the float tensor (logits/probs/topk_probs) or the labels
        rows, cols = (t["shape"] + [1])[:2]
        data = list(t["data"])
        if action in ("nan", "inf"):
            data[0] = float("nan") if action == "nan" else float("inf")
        elif action == "wrongshape":  # one more column in every row
            data = [v for r in range(rows) for v in [*data[r * cols : (r + 1) * cols], data[r * cols]]]
            t["shape"] = [rows, cols + 1]
        else:  # wrongbatch: one row fewer
            data = data[cols:]
            t["shape"] = [rows - 1, *t["shape"][1:]]
        t["data"] = data
        return [*tensors[:-1], t]
