"""`kdd serve`: a converted model as an Open Inference Protocol (KServe v2) model, standard
library only (http.server.ThreadingHTTPServer).

    GET  /v2/health/ready | /v2/health/live     -> 200 {"ready": true} / {"live": true}
    GET  /v2                                    -> server metadata
    GET  /v2/models/{name}  (and /ready)        -> model metadata: inputs, outputs, parameters
    POST /v2/models/{name}/infer                -> {"outputs": [...]}

The request carries one FP32 input of shape [n, C, H, W] (raw pixels in the model's value range;
normalisation happens inside, as for any served model), JSON data flat or nested. Outputs by
kind: logits/probs -> one FP32 output named after the kind, [n, C]; topk -> "topk_indices" INT32
[n, k] and "topk_probs" FP32 [n, k]; labels -> "labels" INT32 [n].

A generative teacher (a diffusion model, kdd_jax/teachers/generative.py) takes "prompt" BYTES [n]
and either "noise" FP32 [n, C, H, W] (x_T, PyTorch latents layout) or "seed" INT64 [n] (x_T rebuilt
with kdd_jax/generative/noise.py's recipe), and answers "images" FP32 [n, H, W, C] in [0, 1].

Binds 127.0.0.1 unless told otherwise. With a token every request but the health checks needs
`Authorization: Bearer <token>` (else 401). A request must arrive whole (request line, headers,
body) within `read_timeout_s` of its first byte, and a connection may idle at most that long
before a request, else it is closed: a client that trickles bytes (slow-loris) or idles cannot hold
a thread. Inference is not under that deadline; writing the answer gets WRITE_TIMEOUT_S. Bodies
over the limit get 413; malformed JSON, wrong shape or datatype, non-finite data get 400 with a
JSON {"error": ...}; unknown models and paths 404.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from kdd_jax.teachers.base import TeacherError
from kdd_jax.teachers.http import Deadline

MAX_BATCH = 4096
READ_TIMEOUT_S = 30.0
MAX_READ_TIMEOUT_S = 86_400.0
WRITE_TIMEOUT_S = 600.0  # sending one answer to a client that stopped reading gives up after this


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class OipServer(ThreadingHTTPServer):
    """One teacher (anything with name/output/num_classes/spec/k and query) served over OIP v2."""

    daemon_threads = True

    def __init__(self, address, teacher, *, name: str, token: str | None = None,
                 max_request_bytes: int = 64 * 2**20, read_timeout_s: float = READ_TIMEOUT_S, verbose: bool = False):
        if not 0 < read_timeout_s <= MAX_READ_TIMEOUT_S:  # also refuses NaN and inf
            raise ValueError(f"read_timeout_s must be in (0, {MAX_READ_TIMEOUT_S:g}] seconds, got {read_timeout_s!r}")
        self.teacher, self.model_name, self.verbose = teacher, name, verbose
        self.read_timeout_s = float(read_timeout_s)
        self._token = token.encode() if token else None
        self.max_request_bytes = int(max_request_bytes)
        self.lock = threading.Lock()  # one forward pass at a time
        self.stats = {"requests": 0, "infer_requests": 0, "rows": 0, "errors": 0, "read_timeouts": 0}
        self._stats_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def handle_error(self, request, client_address):
        # a connection cut by the read deadline, or dropped by its client, is not a server fault
        import sys

        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def authorised(self, header: str | None) -> bool:
        if self._token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self._token)

    @property
    def generative(self) -> bool:
        return getattr(self.teacher, "output", None) == "images"

    def metadata(self) -> dict:
        t = self.teacher
        if self.generative:
            (h, w, c), image = t.spec.noise_shape, list(t.spec.image_shape)
            return {"name": self.model_name, "versions": ["1"], "platform": "kdd-jax",
                    "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1]},
                               {"name": "noise", "datatype": "FP32", "shape": [-1, c, h, w]},
                               {"name": "seed", "datatype": "INT64", "shape": [-1]}],
                    "outputs": [{"name": "images", "datatype": "FP32", "shape": [-1, *image]}],
                    "parameters": {"output_kind": "images", "noise_layout": "NCHW", "image_layout": "NHWC",
                                   "value_range": [0.0, 1.0], "noise_recipe": "kdd_jax.generative.noise (Philox)",
                                   "max_batch_size": MAX_BATCH}}
        c, (h, w) = t.spec.channels, t.spec.input_size
        k = min(getattr(t, "k", 5), t.num_classes)
        outputs = {
            "logits": [{"name": "logits", "datatype": "FP32", "shape": [-1, t.num_classes]}],
            "probs": [{"name": "probs", "datatype": "FP32", "shape": [-1, t.num_classes]}],
            "topk": [{"name": "topk_indices", "datatype": "INT32", "shape": [-1, k]},
                     {"name": "topk_probs", "datatype": "FP32", "shape": [-1, k]}],
            "labels": [{"name": "labels", "datatype": "INT32", "shape": [-1]}],
        }[t.output]
        return {"name": self.model_name, "versions": ["1"], "platform": "kdd-jax",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}], "outputs": outputs,
                "parameters": {"output_kind": t.output, "k": k, "num_classes": t.num_classes,
                               "value_range": list(t.spec.value_range), "layout": "NCHW", "max_batch_size": MAX_BATCH}}

    def infer(self, doc) -> dict:
        if self.generative:
            return self._infer_images(doc)
        t = self.teacher
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
            raise _BadRequest(400, 'expected {"inputs": [one tensor]}')
        inp = doc["inputs"][0]
        if not isinstance(inp, dict):
            raise _BadRequest(400, "input tensor must be an object")
        x = _read_fp32(inp, [t.spec.channels, *t.spec.input_size])
        out = self._run(t.query, x)
        names = _requested(doc)
        n = len(x)
        tensors = []
        if t.output in ("logits", "probs"):
            tensors.append({"name": t.output, "datatype": "FP32", "shape": [n, t.num_classes], "data": out.values.ravel().tolist()})
        elif t.output == "topk":
            k = out.indices.shape[1]
            tensors.append({"name": "topk_indices", "datatype": "INT32", "shape": [n, k], "data": out.indices.ravel().tolist()})
            tensors.append({"name": "topk_probs", "datatype": "FP32", "shape": [n, k], "data": out.values.ravel().tolist()})
        else:
            tensors.append({"name": "labels", "datatype": "INT32", "shape": [n], "data": out.indices.tolist()})
        return self._answer(doc, names, tensors, n)

    def _infer_images(self, doc) -> dict:
        """prompt BYTES [n] + (noise FP32 [n, C, H, W] or seed INT64 [n]) -> images FP32 [n, H, W, C]."""
        from kdd_jax.teachers.generative import GenerationRequest

        t = self.teacher
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
            raise _BadRequest(400, 'expected {"inputs": [prompt, noise or seed]}')
        by_name = {}
        for inp in doc["inputs"]:
            if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
                raise _BadRequest(400, "every input tensor must be an object with a string name")
            if inp["name"] in by_name:
                raise _BadRequest(400, f"input {inp['name']!r} given twice")
            by_name[inp["name"]] = inp
        unknown = set(by_name) - {"prompt", "noise", "seed"}
        if unknown or "prompt" not in by_name or ("noise" in by_name) == ("seed" in by_name):
            raise _BadRequest(400, "inputs must be 'prompt' (BYTES [n]) and exactly one of 'noise' (FP32 [n, C, H, W]) "
                                   f"or 'seed' (INT64 [n]); got {sorted(map(str, by_name))}")
        prompts = _read_strings(by_name["prompt"])
        h, w, c = t.spec.noise_shape
        if "noise" in by_name:
            x = _read_fp32(by_name["noise"], [c, h, w])
            if len(x) != len(prompts):
                raise _BadRequest(400, f"{len(prompts)} prompts but {len(x)} noise tensors")
            req = GenerationRequest(prompts, np.transpose(x, (0, 2, 3, 1)))
        else:
            seeds = _read_ints(by_name["seed"], len(prompts))
            req = GenerationRequest.from_seeds(prompts, seeds, t.spec.noise_shape)
        images = self._run(t.generate, req)
        n = len(req)
        tensors = [{"name": "images", "datatype": "FP32", "shape": [n, *t.spec.image_shape],
                    "data": np.asarray(images, np.float32).ravel().tolist()}]
        return self._answer(doc, _requested(doc), tensors, n)

    def _run(self, fn, arg):
        """One forward pass at a time; a teacher's refusal of the input is the client's 400."""
        with self.lock:
            try:
                return fn(arg)
            except TeacherError as e:
                raise _BadRequest(400, str(e)) from None

    def _answer(self, doc: dict, names: set | None, tensors: list, n: int) -> dict:
        if names is not None:
            unknown = names - {o["name"] for o in tensors}
            if unknown:
                raise _BadRequest(400, f"unknown output(s) {sorted(map(str, unknown))}")
            tensors = [o for o in tensors if o["name"] in names]
        self.count("rows", n)
        answer = {"model_name": self.model_name, "model_version": "1", "outputs": tensors}
        if isinstance(doc.get("id"), str):
            answer["id"] = doc["id"]
        return answer


def _requested(doc: dict) -> set | None:
    requested = doc.get("outputs")
    if isinstance(requested, list) and requested:
        if not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
            raise _BadRequest(400, 'requested "outputs" must be objects with a string "name"')
        return {o["name"] for o in requested}
    return None


def _shape(inp: dict, ndim: int) -> list:
    shape = inp.get("shape")
    if (not isinstance(shape, list) or len(shape) != ndim
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape) or not 1 <= shape[0] <= MAX_BATCH):
        raise _BadRequest(400, f"input {inp.get('name')!r}: shape {shape!r}, expected {ndim} dimensions with "
                               f"1 <= n <= {MAX_BATCH}")
    return shape


def _flat_data(inp: dict) -> list:
    if "data" not in inp:
        raise _BadRequest(400, f"input {inp.get('name')!r} has no JSON data (binary tensor data is not supported)")
    flat = inp["data"]
    if not isinstance(flat, list):
        raise _BadRequest(400, f"input {inp.get('name')!r}: data must be a list")
    while flat and isinstance(flat[0], list):  # nested (row-major) data is allowed, ragged nesting is not
        if not all(isinstance(row, list) for row in flat):
            raise _BadRequest(400, "input data is ragged: mixes numbers and lists at one nesting level")
        flat = [v for row in flat for v in row]
    return flat


def _read_fp32(inp: dict, tail: list) -> np.ndarray:
    """An FP32 input of shape [n, *tail], finite, as float32."""
    if inp.get("datatype") != "FP32":
        raise _BadRequest(400, f"input datatype {inp.get('datatype')!r}, expected 'FP32'")
    shape = _shape(inp, 1 + len(tail))
    if shape[1:] != tail:
        raise _BadRequest(400, f"input shape {shape!r}, expected [n, {', '.join(map(str, tail))}] with 1 <= n <= {MAX_BATCH}")
    flat = _flat_data(inp)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in flat):
        raise _BadRequest(400, "input data must hold only numbers")
    try:
        x = np.asarray(flat, np.float64)
    except OverflowError:  # a JSON integer beyond float range
        raise _BadRequest(400, "input data holds values beyond float32 range") from None
    if x.size != int(np.prod(shape)):
        raise _BadRequest(400, f"{x.size} values for shape {shape}")
    if not np.isfinite(x).all() or (np.abs(x) > np.finfo(np.float32).max).any():
        raise _BadRequest(400, "input data holds non-finite values")
    return x.astype(np.float32).reshape(shape)


def _read_strings(inp: dict) -> list[str]:
    if inp.get("datatype") != "BYTES":
        raise _BadRequest(400, f"input {inp.get('name')!r}: datatype {inp.get('datatype')!r}, expected 'BYTES'")
    shape = _shape(inp, 1)
    data = _flat_data(inp)
    if len(data) != shape[0] or not all(isinstance(v, str) for v in data):
        raise _BadRequest(400, f"input {inp.get('name')!r}: expected {shape[0]} strings")
    if any(len(v) > 4096 for v in data):
        raise _BadRequest(400, f"input {inp.get('name')!r}: a prompt longer than 4096 characters")
    return data


def _read_ints(inp: dict, n: int) -> list[int]:
    if inp.get("datatype") not in ("INT64", "INT32", "UINT64", "UINT32"):
        raise _BadRequest(400, f"input {inp.get('name')!r}: datatype {inp.get('datatype')!r}, expected 'INT64'")
    shape = _shape(inp, 1)
    data = _flat_data(inp)
    if shape[0] != n or len(data) != n:
        raise _BadRequest(400, f"input {inp.get('name')!r}: expected {n} values (one per prompt), got {len(data)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in data):
        raise _BadRequest(400, f"input {inp.get('name')!r}: seeds must be integers in [0, 2**63)")
    return data


class _Handler(BaseHTTPRequestHandler):
    server: OipServer
    protocol_version = "HTTP/1.1"
    server_version = "kdd-serve"

    def handle_one_request(self):
        # An idle keep-alive connection may wait read_timeout_s for its next request's first byte;
        # from that byte on, the request (line, headers, body) must arrive whole within
        # read_timeout_s (the Deadline: per-read timeouts alone let a trickle hold a thread forever).
        self._deadline = None
        self.connection.settimeout(self.server.read_timeout_s)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # the client closed the connection
                return
        except (TimeoutError, OSError):
            self.close_connection = True  # idle past read_timeout_s, or reset
            return
        self._deadline = Deadline(self.server.read_timeout_s)
        self._deadline.watch(self.connection)
        try:
            super().handle_one_request()
        finally:
            if self._deadline.cancel():
                self.server.count("read_timeouts")
                self.close_connection = True

    def _request_read(self) -> bool:
        """The request has been read whole: stop the read deadline (inference and the answer are
        not under it; the answer's write gets WRITE_TIMEOUT_S). False if the deadline fired first
        (the socket is already shut)."""
        if self._deadline.cancel():
            return False
        self.connection.settimeout(WRITE_TIMEOUT_S)
        return True

    def log_message(self, format, *args):  # noqa: A002 - never logs headers, so never the token
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, doc: dict | None = None, extra: dict | None = None, close: bool = False) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        if close:
            self._linger()

    def _linger(self, seconds: float = 2.0) -> None:
        """Closing with a request body still arriving makes the kernel reset the connection, and
        the client loses our answer (a 413 would read as a dropped connection, which clients
        retry). So: stop sending, then read and discard what the client sends, for a short while."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.25)
            stop = time.monotonic() + seconds
            while time.monotonic() < stop and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _error(self, status: int, message: str, **kw) -> None:
        self.server.count("errors")
        self._send(status, {"error": message}, **kw)

    def _route(self) -> tuple[str, str | None]:
        path = self.path.split("?", 1)[0].rstrip("/")
        m = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?", path)
        if m:
            from urllib.parse import unquote

            return (m.group(2) or "/meta").lstrip("/"), unquote(m.group(1))
        return path, None

    def _check(self) -> bool:
        self.server.count("requests")
        if not self.server.authorised(self.headers.get("Authorization")):
            self._drain_small()
            self._error(401, "missing or wrong bearer token", extra={"WWW-Authenticate": "Bearer"})
            return False
        return True

    def _drain_small(self) -> None:
        # read a small body so the connection can be reused; anything big: close instead
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if 0 < n <= 1 << 16:
            self.rfile.read(n)
        elif n != 0:
            self.close_connection = True

    def do_GET(self):  # noqa: N802
        if not self._request_read():  # a GET has no body: it is read whole
            return
        what, model = self._route()
        if model is None and what in ("/v2/health/ready", "/v2/health/live"):  # open, for orchestrator probes
            self.server.count("requests")
            return self._send(200, {what.rsplit("/", 1)[1]: True})
        if not self._check():
            return
        if model is None:
            if what == "/v2":
                from kdd_jax import __version__

                return self._send(200, {"name": "kdd-jax", "version": __version__, "extensions": []})
            return self._error(404, f"no such path {self.path!r}")
        if model != self.server.model_name:
            return self._error(404, f"unknown model {model!r}")
        if what == "ready":
            return self._send(200, {"name": model, "ready": True})
        if what == "meta":
            return self._send(200, self.server.metadata())
        return self._error(405, "use POST for infer", extra={"Allow": "POST"})

    def do_POST(self):  # noqa: N802
        if not self._check():
            return
        what, model = self._route()
        if model is None or what != "infer":
            self._drain_small()
            return self._error(404, f"no such path {self.path!r}")
        if model != self.server.model_name:
            self._drain_small()
            return self._error(404, f"unknown model {model!r}")
        if self.headers.get("Transfer-Encoding"):
            return self._error(411, "send a Content-Length, not a chunked body", close=True)
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            return self._error(411, "Content-Length required", close=True)
        if length > self.server.max_request_bytes:
            return self._error(413, f"request body of {length} bytes exceeds the limit of "
                                    f"{self.server.max_request_bytes} bytes", close=True)
        self.server.count("infer_requests")
        body = self.rfile.read(length)
        if not self._request_read():
            return  # trickled past read_timeout_s: the connection is already cut
        if len(body) != length:
            return self._error(400, "truncated request body", close=True)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            return self._error(400, f"malformed JSON: {e}")
        try:
            answer = self.server.infer(doc)
        except _BadRequest as e:
            return self._error(e.status, str(e))
        except Exception as e:  # noqa: BLE001 - a server answers, it does not die
            return self._error(500, f"inference failed: {type(e).__name__}: {e}")
        self._send(200, answer)


def make_server(teacher, *, name: str | None = None, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                max_request_bytes: int = 64 * 2**20, read_timeout_s: float = READ_TIMEOUT_S,
                verbose: bool = False) -> OipServer:
    """An OipServer for a teacher object (e.g. flax_teacher(...)), bound but not yet serving."""
    return OipServer((host, port), teacher, name=name or teacher.name, token=token,
                     max_request_bytes=max_request_bytes, read_timeout_s=read_timeout_s, verbose=verbose)


def serve_in_thread(model, config, *, name: str = "model", output: str = "logits", k: int = 5, host: str = "127.0.0.1",
                    port: int = 0, token: str | None = None, max_request_bytes: int = 64 * 2**20,
                    read_timeout_s: float = READ_TIMEOUT_S, teacher=None) -> tuple[OipServer, str]:
    """Serve a Flax model (or `teacher`, if given) in a daemon thread; returns (server, base url).
    Stop with `server.shutdown(); server.server_close()`."""
    if teacher is None:
        from kdd_jax.teachers.local import flax_teacher

        teacher = flax_teacher(name, model, config, output=output, k=k)
    server = make_server(teacher, name=name, host=host, port=port, token=token, max_request_bytes=max_request_bytes,
                         read_timeout_s=read_timeout_s)
    threading.Thread(target=server.serve_forever, name=f"kdd-serve-{name}", daemon=True).start()
    return server, server.url
