"""A teacher served over HTTP with the Open Inference Protocol (KServe v2; Triton, MLServer,
`kdd serve`), queried with the standard library only.

    POST {url}/v2/models/{model}/infer
    {"inputs": [{"name": "input", "shape": [n, C, H, W], "datatype": "FP32", "data": [...]}]}

Outputs are read by name, per kind: logits/probs -> one FP32 tensor [n, C] (named after the
kind, or the only output); topk -> "topk_indices" (INT32/INT64 [n, k]) and "topk_probs"
(FP32 [n, k]); labels -> "labels" (INT32/INT64 [n]).

Batches of `batch_size` are sent with at most `concurrency` requests in flight. `timeout_s`
bounds each request as a whole (connect, send, the complete answer): a watchdog shuts the socket
down when it runs out, so a server that trickles its answer (slow-loris) cannot stall a run, as
it could with socket timeouts alone (they bound each read). 429, 5xx, timeouts and connection
errors are retried up to `max_retries` times with exponential backoff and jitter, honouring
Retry-After (seconds). Answers that are not JSON, have the wrong shape, batch size or datatype,
are non-finite, or are larger than the values asked for can take (ANSWER_BYTES_PER_VALUE bytes a
value plus ANSWER_SLACK_BYTES; refused before they are read) raise TeacherError (not retried: a
server that answers wrongly once will again). Every answer goes through validate_output, so a
CachedTeacher in front never stores a wrong one; and each batch is handed to `on_part` as soon as it is validated, so a CachedTeacher
stores it at once: a later batch's failure (or a crash) never loses answers already paid for.

An optional bearer token is read from the environment variable named by `token_env` at each
request; it is never stored on the object, logged, or put into an error message. Redirects are
not followed (urllib would forward the token to the new location): a 3xx is an error.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kdd_jax.teachers.base import OUTPUT_KINDS, TeacherError, TeacherOutput, validate_output
from kdd_jax.teachers.local import InputSpec

FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0
# An answer is read only up to a bound derived from what was asked: the values expected (n x C
# scores, or n images) at ANSWER_BYTES_PER_VALUE bytes of JSON each (a float32 printed in full is
# ~16 characters; nested, pretty-printed arrays measured ~70) plus ANSWER_SLACK_BYTES for names,
# shapes and any extra outputs a server returns unasked. A server that streams more is refused
# before it can exhaust memory.
ANSWER_BYTES_PER_VALUE = 256
ANSWER_SLACK_BYTES = 16 << 20


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Deadline:
    """Shuts down every socket of one request when its time is up. Why: socket timeouts bound
    each read, so a peer sending a byte per (timeout - epsilon) would hold a request forever.
    Used by the client (the whole request) and by `kdd serve` (reading a request)."""

    def __init__(self, seconds: float):
        self.fired = False
        self._cancelled = False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            fired = self.fired
        if fired:
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._cancelled:  # cancel() won the race: it already told its caller "not fired"
                return
            self.fired = True
            socks = list(self._socks)
        for sock in socks:
            _shutdown(sock)

    def cancel(self) -> bool:
        """Stop the timer; True if it had already fired (decided atomically with _fire)."""
        self._timer.cancel()
        with self._lock:
            self._cancelled = True
            return self.fired


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once; the owner closes it
    except OSError:
        pass


class _Watched:
    """Connection mixin: the socket (TLS-wrapped for HTTPS) is handed to the request's deadline."""

    def __init__(self, *args, deadline: Deadline, **kw):
        super().__init__(*args, **kw)
        self._deadline = deadline

    def connect(self):
        super().connect()
        self._deadline.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, deadline=self._deadline), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPS, deadline=self._deadline), req, context=self._context)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        # urllib would follow a 301/302/303 (as a GET) with every header, the bearer token included,
        # to wherever it points: refused, so it surfaces as an HTTP 3xx error naming the teacher
        return None


def _opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """urllib's default opener (proxies from the environment included) that follows no redirects,
    its connections watched by `deadline`."""
    return urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline), _NoRedirects)


def answer_cap(values: int) -> int:
    """The most bytes an answer holding `values` scalars may take (see ANSWER_BYTES_PER_VALUE)."""
    return ANSWER_BYTES_PER_VALUE * int(values) + ANSWER_SLACK_BYTES


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        s = float(value.strip())
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
    return min(max(s, 0.0), MAX_RETRY_AFTER_S) if np.isfinite(s) else None


class OipClient:
    """What every Open Inference Protocol client here shares: URL checks, the bearer token, one
    request with a whole-request deadline, retries with backoff, batches with bounded concurrency,
    and strict reading of answer tensors. Subclasses build request bodies and parse answers."""

    streams_parts = True  # query(..., on_part=) hands over each batch as it arrives (the cache stores it)

    def _setup(self, name: str, url: str, *, model: str | None, timeout_s: float, max_retries: int, batch_size: int,
               concurrency: int, token_env: str | None, backoff_s: float, max_backoff_s: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"teacher {name!r}: url must be http(s)://host[:port][/prefix], got {url!r}")
        if parsed.username or parsed.password:
            raise ValueError(f"teacher {name!r}: put credentials in token_env, not in the url")
        for what, v in (("batch_size", batch_size), ("concurrency", concurrency)):
            if v < 1:
                raise ValueError(f"teacher {name!r}: {what} must be >= 1")
        if max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"teacher {name!r}: max_retries must be >= 0 and timeout_s > 0")
        self.name = name
        self.url = url.rstrip("/")
        self.model = model or name
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.batch_size, self.concurrency = int(batch_size), int(concurrency)
        self.token_env = token_env
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{urllib.parse.quote(self.model, safe='')}/infer"

    def _batches(self, n: int, one) -> list:
        """`one(start)` for every batch start in [0, n), at most `concurrency` at once, in order."""
        starts = range(0, n, self.batch_size)
        if len(starts) <= 1 or self.concurrency == 1:
            return [one(s) for s in starts]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(starts)), thread_name_prefix=f"teacher-{self.name}")
        try:
            futures = [pool.submit(one, s) for s in starts]
            return [f.result() for f in futures]
        finally:  # batches already sent finish (and are handed over) before an error propagates
            pool.shutdown(wait=True, cancel_futures=True)

    def _send(self, doc: dict, values: int) -> bytes:
        """POST `doc` to the infer URL, retrying what is worth retrying; the raw answer body, which
        may be at most `answer_cap(values)` bytes (`values`: the scalars the answer should hold)."""
        body = json.dumps(doc).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body, headers, answer_cap(values))
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    raise self._fail(f"gave up after {attempt + 1} attempt(s) to {self.infer_url}; last error: {last}") from None
                self.retries += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _outputs(self, raw: bytes) -> tuple[list, dict]:
        """(outputs list, outputs by name) of an answer body, or TeacherError."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise self._fail(f"answer is not valid JSON ({e})") from None
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise self._fail('answer has no "outputs" list')
        return outputs, {o["name"]: o for o in outputs if isinstance(o.get("name"), str)}

    # -- one request: token, deadline, errors, answer tensors --------------------------------
    def _fail(self, message: str) -> TeacherError:
        return TeacherError(self._scrub(f"teacher {self.name!r}: {message}"))

    def _scrub(self, text: str) -> str:
        token = self._token(required=False)
        return text.replace(token, "[redacted]") if token else text

    def _token(self, required: bool = True) -> str | None:
        if not self.token_env:
            return None
        token = os.environ.get(self.token_env)
        if not token and required:
            raise TeacherError(f"teacher {self.name!r}: environment variable {self.token_env} (token_env) is not set")
        return token or None

    def _post(self, body: bytes, headers: dict, cap: int) -> bytes:
        self.requests += 1
        req = urllib.request.Request(self.infer_url, data=body, headers=headers, method="POST")
        deadline = Deadline(self.timeout_s)
        try:
            try:
                with _opener(deadline).open(req, timeout=self.timeout_s) as resp:
                    declared = resp.length  # http.client's parse: None when chunked or close-delimited
                    if declared is not None and declared > cap:
                        raise self._too_big(f"declares Content-Length {declared}", cap)
                    raw = resp.read(cap + 1)
                    if len(raw) > cap:
                        raise self._too_big("runs past the bound", cap)
                    if declared is not None and len(raw) < declared:
                        # read(n) returns what came before the close; read() would have raised this
                        raise http.client.IncompleteRead(raw, declared - len(raw))
            finally:
                fired = deadline.cancel()
            if fired:  # a close-delimited answer cut short reads as complete
                raise OSError("deadline")
            return raw
        except urllib.error.HTTPError as e:
            if deadline.fired:
                raise self._too_slow() from None
            try:
                detail = e.read(500).decode("utf-8", "replace").strip()
            except Exception:  # noqa: BLE001 - the status is what matters
                detail = ""
            msg = f"HTTP {e.code} {e.reason}" + (f": {detail[:300]}" if detail else "")
            if e.code in RETRY_STATUS:
                raise _Retryable(msg, _retry_after(e.headers.get("Retry-After")) if e.headers else None) from None
            raise self._fail(f"{self.infer_url} answered {msg}") from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable(f"timed out after {self.timeout_s:g}s ({e})") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if deadline.fired:
                raise self._too_slow() from None
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout_s:g}s") from None
            raise _Retryable(f"connection error: {reason}") from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:  # dropped / truncated transfers
            if deadline.fired:
                raise self._too_slow() from None
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None

    def _too_big(self, what: str, cap: int) -> TeacherError:
        # not retried: a server that answers too much once will again
        return self._fail(f"answer {what}, more than the {cap} bytes the values asked for can take "
                          f"({ANSWER_BYTES_PER_VALUE} bytes a value + {ANSWER_SLACK_BYTES} bytes); refused unread")

    def _too_slow(self) -> _Retryable:
        return _Retryable(f"no complete answer within {self.timeout_s:g}s (timeout_s; a stalled or trickling server)")

    def _need(self, by_name: dict, name: str) -> dict:
        if name not in by_name:
            raise self._fail(f"no output named {name!r} among {sorted(map(str, by_name))}")
        return by_name[name]

    def _tensor(self, o: dict, want: tuple, kind: type) -> np.ndarray:
        name, dt, shape, data = o.get("name"), o.get("datatype"), o.get("shape"), o.get("data")
        if not isinstance(dt, str):
            raise self._fail(f"output {name!r} has no valid datatype ({dt!r})")
        if kind is float and dt not in FLOAT_TYPES:
            raise self._fail(f"output {name!r} has datatype {dt!r}, expected FP32")
        if kind is int and dt not in INT_TYPES:
            raise self._fail(f"output {name!r} has datatype {dt!r}, expected INT32 or INT64")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise self._fail(f"output {name!r} has no valid shape ({shape!r})")
        if tuple(shape) != want:
            raise self._fail(f"output {name!r} of shape {shape}, expected {list(want)}")
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float range
            raise self._fail(f"output {name!r}: data is not a list of numbers") from None
        if arr.size != int(np.prod(want)):
            raise self._fail(f"output {name!r}: {arr.size} values for shape {list(want)}")
        arr = arr.reshape(want)
        if kind is int:
            if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
                raise self._fail(f"output {name!r}: {dt} data holds non-integers")
            if (np.abs(arr) > np.iinfo(np.int32).max).any():  # before the cast, which would wrap
                raise self._fail(f"output {name!r}: class index out of range")
            return arr.astype(np.int64)
        with np.errstate(over="ignore", invalid="ignore"):
            return arr.astype(np.float32)  # beyond float32's range: inf; validate_output reports non-finite


class HttpTeacher(OipClient):
    """A black-box classifier teacher behind an Open Inference Protocol v2 REST endpoint."""

    def __init__(self, name: str, url: str, *, num_classes: int, spec: InputSpec, model: str | None = None,
                 output: str = "probs", k: int = 5, timeout_s: float = 30.0, max_retries: int = 4,
                 batch_size: int = 64, concurrency: int = 4, token_env: str | None = None,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, input_name: str = "input"):
        if output not in OUTPUT_KINDS:
            raise ValueError(f"teacher {name!r}: unknown output kind {output!r}; expected one of {OUTPUT_KINDS}")
        for what, v in (("k", k), ("num_classes", num_classes)):
            if v < 1:
                raise ValueError(f"teacher {name!r}: {what} must be >= 1")
        self._setup(name, url, model=model, timeout_s=timeout_s, max_retries=max_retries, batch_size=batch_size,
                    concurrency=concurrency, token_env=token_env, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self.output, self.k, self.num_classes, self.spec = output, k, num_classes, spec
        self.input_name = input_name

    def __repr__(self) -> str:
        return f"HttpTeacher(name={self.name!r}, url={self.url!r}, model={self.model!r}, output={self.output!r})"

    # -- the Teacher protocol ---------------------------------------------------------------
    def query(self, inputs: np.ndarray, on_part=None) -> TeacherOutput:
        """Answers for `inputs`. `on_part(start, output)`, if given, gets each validated batch (rows
        start .. start + len(output)) as soon as it arrives, from the thread that received it."""
        inputs = np.asarray(inputs, np.float32)
        self.spec.check(inputs, self.name)
        if not np.isfinite(inputs).all():
            raise TeacherError(f"teacher {self.name!r}: non-finite inputs")
        if not len(inputs):
            return validate_output(self._empty(), 0, self.num_classes, self.name)

        def one(start: int) -> TeacherOutput:
            out = self._query_batch(inputs[start : start + self.batch_size])
            if on_part is not None:
                on_part(start, out)
            return out

        return TeacherOutput.concat(self._batches(len(inputs), one))

    def _empty(self) -> TeacherOutput:
        c = self.num_classes
        kk = min(self.k, c)
        return {"logits": TeacherOutput("logits", values=np.zeros((0, c), np.float32)),
                "probs": TeacherOutput("probs", values=np.zeros((0, c), np.float32)),
                "topk": TeacherOutput("topk", values=np.zeros((0, kk), np.float32), indices=np.zeros((0, kk), np.int32)),
                "labels": TeacherOutput("labels", indices=np.zeros((0,), np.int32))}[self.output]

    def _query_batch(self, x: np.ndarray) -> TeacherOutput:
        values = len(x) * (2 * self.k if self.output == "topk" else 1 if self.output == "labels" else self.num_classes)
        raw = self._send({"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                                      "data": x.ravel().tolist()}]}, values)
        return validate_output(self._parse(raw, len(x)), len(x), self.num_classes, self.name)

    def _parse(self, raw: bytes, n: int) -> TeacherOutput:
        outputs, by_name = self._outputs(raw)
        if self.output in ("logits", "probs"):
            o = by_name.get(self.output) or (outputs[0] if len(outputs) == 1 else None)
            if o is None:
                raise self._fail(f"no output named {self.output!r} among {sorted(map(str, by_name))}")
            return TeacherOutput(self.output, values=self._tensor(o, (n, self.num_classes), float))
        if self.output == "topk":
            kk = min(self.k, self.num_classes)
            idx, vals = (self._need(by_name, "topk_indices"), self._need(by_name, "topk_probs"))
            return TeacherOutput("topk", values=self._tensor(vals, (n, kk), float), indices=self._tensor(idx, (n, kk), int))
        return TeacherOutput("labels", indices=self._tensor(self._need(by_name, "labels"), (n,), int))

class HttpGenerativeTeacher(OipClient):
    """A black-box generative teacher over OIP v2: (prompt, x_T) rows -> images.

    Request: "prompt" BYTES [n] (UTF-8 strings; "" = the empty prompt) and either "noise" FP32
    [n, C, H, W] (x_T in PyTorch's latents layout; `send="noise"`, the default: exact whatever the
    server's RNG) or "seed" INT64 [n] (`send="seed"`: the server rebuilds x_T with the documented
    recipe of kdd_jax/generative/noise.py; rows without seeds cannot be sent this way). Answer:
    "images" FP32 [n, H, W, C] in [0, 1]."""

    output = "images"

    def __init__(self, name: str, url: str, *, spec, model: str | None = None, send: str = "noise",
                 timeout_s: float = 120.0, max_retries: int = 4, batch_size: int = 16, concurrency: int = 2,
                 token_env: str | None = None, backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        if send not in ("noise", "seed"):
            raise ValueError(f"teacher {name!r}: send must be 'noise' or 'seed', got {send!r}")
        self._setup(name, url, model=model, timeout_s=timeout_s, max_retries=max_retries, batch_size=batch_size,
                    concurrency=concurrency, token_env=token_env, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self.spec, self.send = spec, send

    def __repr__(self) -> str:
        return f"HttpGenerativeTeacher(name={self.name!r}, url={self.url!r}, model={self.model!r}, send={self.send!r})"

    def generate(self, req, on_part=None) -> np.ndarray:
        """Images for a GenerationRequest; `on_part(start, images)` gets each validated batch as it arrives."""
        from kdd_jax.teachers.generative import _check_request

        _check_request(req, self.spec, self.name)
        if self.send == "seed" and req.seeds is None:
            raise TeacherError(f"teacher {self.name!r} takes seeds (send: seed) but the request carries none")
        if not len(req):
            return np.zeros((0, *self.spec.image_shape), np.float32)

        def one(start: int) -> np.ndarray:
            images = self._generate_batch(req[start : start + self.batch_size])
            if on_part is not None:
                on_part(start, images)
            return images

        return np.concatenate(self._batches(len(req), one))

    def _generate_batch(self, req) -> np.ndarray:
        from kdd_jax.teachers.generative import validate_images

        n = len(req)
        inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [n], "data": list(req.prompts)}]
        if self.send == "seed":
            inputs.append({"name": "seed", "datatype": "INT64", "shape": [n], "data": req.seeds.tolist()})
        else:
            x = np.transpose(req.noise, (0, 3, 1, 2))
            inputs.append({"name": "noise", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()})
        outputs, by_name = self._outputs(self._send({"inputs": inputs}, n * int(np.prod(self.spec.image_shape))))
        o = by_name.get("images") or (outputs[0] if len(outputs) == 1 else None)
        if o is None:
            raise self._fail(f"no output named 'images' among {sorted(map(str, by_name))}")
        return validate_images(self._tensor(o, (n, *self.spec.image_shape), float), n, self.spec, self.name)


def http_teacher_from_entry(entry) -> HttpTeacher:
    """An HttpTeacher for a `kind: "http"` teachers-file entry."""
    spec = InputSpec(tuple(entry.input_size), entry.channels, tuple(entry.value_range))
    return HttpTeacher(entry.name, entry.url, model=entry.model or entry.name, num_classes=entry.num_classes, spec=spec,
                       output=entry.output, k=entry.k, timeout_s=entry.timeout_s, max_retries=entry.max_retries,
                       batch_size=entry.batch_size, concurrency=entry.concurrency, token_env=entry.token_env)
