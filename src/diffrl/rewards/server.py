"""Run a reward in another process, environment, GPU or host, and score against it over HTTP.

Protocol (JSON over HTTP; nothing is ever unpickled):

- ``GET /health`` -> ``{"status": "ok", "reward": NAME, "protocol": 1}``
- ``POST /score`` with ``{"prompts": [...], "metadata": [{...}, ...], "images": IMAGES}`` ->
  ``{"scores": [float | null, ...]}`` (``null`` for a non-finite score), or an error status with ``{"error": MSG}``.

``IMAGES`` is ``{"format": "png", "data": [base64 PNG, ...]}`` (8-bit, what any reward sees from a saved image),
``{"format": "npz", "data": base64 .npz}`` with a uint8 ``images`` array ``[B, H, W, 3]``, or ``"npz32"``: the same
with float32 ``[B, 3, H, W]`` in [0, 1], exact. :func:`serve` wraps any reward callable;
:class:`RemoteReward` is the client, a reward like any other (registry name ``remote``, or the server's URL as the
reward spec). The server binds to 127.0.0.1 unless told otherwise: it runs no authentication.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import random
import socket
import threading
import time
import urllib.parse
import zipfile
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from diffrl.rewards.combine import check_scores, to_uint8

PROTOCOL = 1
FORMATS = ("png", "npz", "npz32")


# --------------------------------------------------------------------------------------------------------------------
# image encoding


def encode_images(images: torch.Tensor, fmt: str = "png") -> dict:
    """Images ``[B, 3, H, W]`` in [0, 1] -> the JSON-able ``images`` field of a request."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}.")
    if fmt == "png":
        from PIL import Image

        data = []
        for array in to_uint8(images):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
            data.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return {"format": "png", "data": data}
    if fmt in ("npz", "npz32"):
        array = to_uint8(images) if fmt == "npz" else images.detach().float().cpu().numpy()
        buffer = io.BytesIO()
        np.savez(buffer, images=array)
        return {"format": fmt, "data": base64.b64encode(buffer.getvalue()).decode("ascii")}
    raise ValueError(f"image format {fmt!r} is not one of {FORMATS}.")


MAX_PIXELS = 4096 * 4096  # per request, summed over its images: far above any reward's input (SDXL: 1024^2 each)


def decode_images(field: dict, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The ``images`` field of a request -> float32 ``[B, 3, H, W]`` in [0, 1].

    Sizes are checked before anything is decompressed (a PNG's header, an npz member's array header and size), so a
    small request that would decode to gigabytes is a ``ValueError``, not an allocation."""
    fmt = field.get("format") if isinstance(field, dict) else None
    if fmt == "png":
        from PIL import Image

        items = field.get("data", [])
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("png images must be a list of base64 strings.")
        arrays, pixels = [], 0
        for item in items:
            with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
                pixels += image.width * image.height  # from the header: nothing decoded yet
                if pixels > max_pixels:
                    raise ValueError(f"the request's images hold over {max_pixels} pixels; send smaller batches.")
                arrays.append(np.asarray(image.convert("RGB")))
        if not arrays:
            raise ValueError("the request has no images.")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all images of a request must have one size; got {sorted(shapes)}.")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    if fmt in ("npz", "npz32"):
        array = _load_npz_images(base64.b64decode(field.get("data", ""), validate=True), max_pixels)
        if fmt == "npz":
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"npz images must be uint8 [B, H, W, 3]; got {array.dtype} {array.shape}.")
            return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
        if array.dtype != np.float32 or array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"npz32 images must be float32 [B, 3, H, W]; got {array.dtype} {array.shape}.")
        return torch.from_numpy(array)
    raise ValueError(f"images.format must be one of {FORMATS}; got {fmt!r}.")


def _load_npz_images(data: bytes, max_pixels: int) -> np.ndarray:
    """The ``images`` array of an .npz archive, its header and uncompressed size checked before it is read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError("npz images must be an .npz archive (np.savez); got something else.") from None
    with archive:
        try:
            info = archive.getinfo("images.npy")
        except KeyError:
            raise ValueError("the npz archive has no 'images' array.") from None
        limit = max_pixels * 3 * 4 + 4096  # float32 RGB at the pixel limit, plus the .npy header
        if info.file_size > limit:
            raise ValueError(f"the npz images are {info.file_size} bytes uncompressed; the limit is {limit}.")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            if dtype.hasobject:
                raise ValueError("npz images must be a numeric array.")
            count = math.prod(shape)
            if count > max_pixels * 3 or count * dtype.itemsize > limit:
                raise ValueError(f"the request's images hold over {max_pixels} pixels; send smaller batches.")
            raw = member.read(count * dtype.itemsize + 1)
        if len(raw) != count * dtype.itemsize:
            raise ValueError("the npz images array is truncated or longer than its header says.")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return array.copy()  # writable, contiguous


# --------------------------------------------------------------------------------------------------------------------
# server


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring with one reward; requests are scored one at a time (rewards need not be thread-safe).

    Args:
        reward: the callable ``(images, prompts, metadata) -> Tensor[B]``.
        name: the name it reports and puts in error messages.
        address: ``(host, port)``; port 0 picks a free one (see :attr:`url`).
        max_request_mb: larger requests are refused with status 413.
        max_pending: requests waiting or being scored at once; more are answered 503 (busy), which clients retry
            with backoff. Bounds the server's memory under a burst.
        max_connections: open connections (one thread each); more are answered 503 and closed at once.
        read_timeout: seconds a client has to send a whole request (headers and body); a slower one is cut off,
            so idle or trickling connections cannot hold the server.
        max_pixels: pixels a request's images may decode to, summed (checked before decoding).
    """

    daemon_threads = True

    def __init__(
        self,
        reward,
        name: str,
        address: tuple[str, int] = ("127.0.0.1", 0),
        max_request_mb: float = 512,
        max_pending: int = 32,
        max_connections: int = 64,
        read_timeout: float = 30.0,
        max_pixels: int = MAX_PIXELS,
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1; got {max_pending}.")
        if not (math.isfinite(max_request_mb) and max_request_mb > 0):
            raise ValueError(f"max_request_mb must be a positive number of megabytes; got {max_request_mb}.")
        if max_connections < max_pending:
            raise ValueError(f"max_connections ({max_connections}) must be >= max_pending ({max_pending}).")
        if not (math.isfinite(read_timeout) and read_timeout > 0):
            raise ValueError(f"read_timeout must be > 0 seconds; got {read_timeout}.")
        self.reward = reward
        self.reward_name = name
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.max_pending = max_pending
        self.pending = threading.BoundedSemaphore(max_pending)
        self.connections = threading.BoundedSemaphore(max_connections)
        self.read_timeout = read_timeout
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.busy_replies = 0  # requests answered 503 because max_pending were already in
        self.refused_connections = 0  # connections closed at once because max_connections were open
        self._count_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        """One thread per connection, at most ``max_connections``: past that, a 503 and the connection closed."""
        if not self.connections.acquire(blocking=False):
            with self._count_lock:
                self.refused_connections += 1
            body = b'{"error": "busy: too many open connections; retry later."}'
            head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(head.encode() + body)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def parse(self, request: dict) -> tuple[torch.Tensor, list[str], list[dict]]:
        """A request's images, prompts and metadata; ``ValueError`` says what is wrong with it."""
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("'prompts' must be a list of strings.")
        images = decode_images(request.get("images"), self.max_pixels)
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts.")
        metadata = request.get("metadata") or [{} for _ in prompts]
        if not isinstance(metadata, list) or len(metadata) != len(prompts):
            raise ValueError("'metadata' must be a list with one object per prompt.")
        return images, prompts, metadata

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float | None]:
        """The reward's checked scores, ``None`` where non-finite (JSON has no NaN)."""
        with self.lock, torch.no_grad():
            scores = check_scores(self.reward_name, self.reward(images, prompts, metadata), len(prompts))
        return [value if math.isfinite(value) else None for value in scores.tolist()]


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # each read of the socket; the body also has a deadline
        super().setup()

    def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise in training logs
        return

    def _reply(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (its timeout) or went away before the answer
            self.close_connection = True

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "reward": self.server.reward_name, "protocol": PROTOCOL})
        else:
            self._reply(404, {"error": f"no endpoint {self.path!r}; use GET /health or POST /score."})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"no endpoint {self.path!r}; use POST /score."})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._reply(400, {"error": "bad request: Content-Length must be a non-negative integer."})
            return
        if length > self.server.max_request_bytes:
            self.close_connection = True
            self._reply(413, {"error": f"request of {length} bytes is over the server's limit; send smaller batches."})
            return
        try:
            body = self._read_body(length)
        except (TimeoutError, OSError):
            self.close_connection = True  # too slow, or gone: nobody is listening for an answer
            return
        if not self.server.pending.acquire(blocking=False):
            with self.server._count_lock:
                self.server.busy_replies += 1
            self._reply(503, {"error": f"busy: {self.server.max_pending} requests are already pending; retry later."})
            return
        try:
            self._score(body)
        finally:
            self.server.pending.release()

    def _read_body(self, length: int) -> bytes:
        """The request body, read within ``read_timeout`` seconds in all (not per read: a client trickling a byte
        at a time is cut off too)."""
        deadline = time.monotonic() + self.server.read_timeout
        chunks, left = [], length
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request body not received in time")
            self.connection.settimeout(remaining)
            chunk = self.rfile.read1(min(left, 1 << 16))
            if not chunk:
                raise ConnectionError("the client closed the connection mid-request")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _score(self, body: bytes) -> None:
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("the request body must be a JSON object.")
            images, prompts, metadata = self.server.parse(request)
        except RecursionError:
            self._reply(400, {"error": "bad request: the JSON is nested too deeply."})
            return
        except Exception as error:  # anything a malformed body makes a decoder raise (PIL's bomb check included)
            self._reply(400, {"error": f"bad request: {type(error).__name__}: {error}"})
            return
        try:
            scores = self.server.score(images, prompts, metadata)
        except Exception as error:  # the reward itself failed: report it, keep serving
            self._reply(500, {"error": f"reward {self.server.reward_name!r} raised {type(error).__name__}: {error}"})
            return
        self._reply(200, {"scores": scores})


def serve(reward, name: str, host: str = "127.0.0.1", port: int = 0, **limits) -> RewardServer:
    """Start serving ``reward`` in a background thread; returns the server (``.url``; ``.shutdown()`` stops it).
    ``limits`` are :class:`RewardServer`'s ``max_request_mb``, ``max_pending``, ``max_connections``,
    ``read_timeout`` and ``max_pixels``."""
    server = RewardServer(reward, name, (host, port), **limits)
    threading.Thread(target=server.serve_forever, name=f"reward-server-{name}", daemon=True).start()
    return server


# --------------------------------------------------------------------------------------------------------------------
# client


class RemoteReward:
    """A reward served by :func:`serve` (or ``diffrl serve-reward``), called like any reward.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds to wait for one batch's reply.
        retries: further attempts after a connection failure, a timeout or a 502/503/504 (a reward error is not
            retried: it would fail again).
        backoff: seconds before the first retry; doubled after each.
        batch_size: images per request.
        image_format: ``"png"`` (8-bit), ``"npz"`` (8-bit, faster) or ``"npz32"`` (exact float32).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
        image_format: str = "png",
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server url must start with http:// or https://; got {url!r}.")
        if image_format not in FORMATS:
            raise ValueError(f"image_format must be one of {FORMATS}; got {image_format!r}.")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError("timeout must be > 0, retries and backoff >= 0, batch_size >= 1.")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.batch_size, self.image_format = batch_size, image_format
        self._jitter = random.Random()
        self.__name__ = "remote"

    def _post(self, body: bytes) -> dict:
        delay, last_error, busy, timed_out = self.backoff, None, False, False
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay * self._jitter.uniform(0.5, 1.5))  # jitter: clients refused together spread out
                delay *= 2
            try:
                status, payload = _post_within(f"{self.url}/score", body, self.timeout)
            except TimeoutError:
                last_error, busy, timed_out = "timed out", False, True
                continue
            except (OSError, HTTPException) as error:
                last_error, busy = str(getattr(error, "reason", error)) or type(error).__name__, False
                continue
            if status == 200:
                try:
                    return json.loads(payload)
                except ValueError:
                    raise RuntimeError(f"reward server {self.url} sent a reply that is not JSON.") from None
            message = _error_text(payload, status)
            if status not in (502, 503, 504):
                raise RuntimeError(f"reward server {self.url} answered {status}: {message}") from None
            last_error, busy = f"{status}: {message}", status == 503
        if busy:
            advice = (
                "The server is overloaded (more clients than its --max-pending): raise the client's retries or "
                'backoff (reward.kwargs {"remote": {"retries": n, "backoff": seconds}}) or start the server '
                "with a larger --max-pending."
            )
        elif timed_out:
            advice = (
                f"It is running but slow: raise the client's timeout (now {self.timeout:g} s; reward.kwargs "
                '{"remote": {"url": ..., "timeout": seconds}}) or give the server a faster device.'
            )
        else:
            advice = "Start it (e.g. `diffrl serve-reward pickscore --port 8000`) or fix the url in the reward config."
        raise ConnectionError(
            f"reward server {self.url} did not answer after {self.retries + 1} attempts (last: {last_error}). {advice}"
        )

    def health(self) -> dict:
        status, payload = _post_within(f"{self.url}/health", None, self.timeout)
        if status != 200:
            raise RuntimeError(f"reward server {self.url} answered {status}: {_error_text(payload, status)}")
        return json.loads(payload)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            body = {
                "prompts": list(prompts[start:stop]),
                "metadata": list(metadata[start:stop]),
                "images": encode_images(images[start:stop], self.image_format),
            }
            reply = self._post(json.dumps(body, default=str).encode())
            batch = reply.get("scores") if isinstance(reply, dict) else None
            numbers = isinstance(batch, list) and all(
                value is None or (isinstance(value, int | float) and not isinstance(value, bool)) for value in batch
            )
            if not numbers or len(batch) != len(body["prompts"]):
                shown = repr(batch)[:200]
                raise RuntimeError(f"reward server {self.url} sent {shown} instead of one number (or null) per image.")
            scores.extend(math.nan if value is None else float(value) for value in batch)
        return torch.tensor(scores, dtype=torch.float32)


def _post_within(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """POST ``body`` (GET when None) to ``url``; the whole exchange must end within ``timeout`` seconds: a watchdog
    shuts the socket at the deadline, so a server that trickles its answer is cut off then, not after a timeout per
    read. Returns (status, body); raises ``TimeoutError`` past the deadline."""
    parts = urllib.parse.urlsplit(url)
    connection_type = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    connection = connection_type(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()
    sockets = []

    def expire() -> None:
        expired.set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        sockets.append(connection.sock)
        if expired.is_set():  # the deadline passed while connecting
            raise TimeoutError
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request("POST" if body is not None else "GET", parts.path or "/", body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        if expired.is_set():
            raise TimeoutError
        return response.status, payload
    except (OSError, HTTPException):
        if expired.is_set():
            raise TimeoutError(f"no whole answer within {timeout:g} s") from None
        raise
    finally:
        watchdog.cancel()
        connection.close()


def _error_text(payload: bytes, status: int) -> str:
    try:
        return str(json.loads(payload).get("error", status))
    except (ValueError, AttributeError):
        return f"status {status}"


# --------------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None, prog: str = "diffrl serve-reward") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve one reward over HTTP (loopback by default). Train against it with "
        "--reward.spec http://HOST:PORT.",
    )
    parser.add_argument("reward", help="registry name, 'package.module:function' or 'path/to/file.py:function'")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments for a registry reward")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--max-request-mb", type=float, default=512)
    parser.add_argument(
        "--max-pending", type=int, default=32, help="requests in the server at once; more get 503 (clients retry)"
    )
    parser.add_argument("--max-connections", type=int, default=64, help="open connections; more get 503 at once")
    parser.add_argument("--read-timeout", type=float, default=30.0, help="seconds a client has to send a request")
    args = parser.parse_args(argv)
    from diffrl.rewards.registry import build_reward

    problems = [
        (not 0 <= args.port <= 65535, f"--port must be in 0-65535 (0: any free port); got {args.port}"),
        (args.max_pending < 1, f"--max-pending must be >= 1; got {args.max_pending}"),
        (not args.max_request_mb > 0, f"--max-request-mb must be > 0; got {args.max_request_mb}"),
        (args.max_connections < args.max_pending, "--max-connections must be >= --max-pending"),
        (not args.read_timeout > 0, f"--read-timeout must be > 0 seconds; got {args.read_timeout}"),
    ]
    for bad, message in problems:
        if bad:
            print(f"{prog}: {message}.")
            return 2
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--kwargs must be a JSON object")
        reward = build_reward(args.reward, **kwargs)
        server = RewardServer(
            reward,
            args.reward,
            (args.host, args.port),
            max_request_mb=args.max_request_mb,
            max_pending=args.max_pending,
            max_connections=args.max_connections,
            read_timeout=args.read_timeout,
        )
    except OSError as error:
        print(f"{prog}: cannot listen on {args.host}:{args.port}: {error.strerror or error}; pick another --port.")
        return 2
    except (ValueError, TypeError, ImportError) as error:
        print(f"{prog}: {error}")
        return 2
    run_forever(server)
    return 0


def run_forever(server: RewardServer) -> None:
    """Serve in the foreground until Ctrl-C, then release the port."""
    print(f"serving reward {server.reward_name!r} at {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
