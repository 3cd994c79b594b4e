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
import io
import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
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


def decode_images(field: dict) -> torch.Tensor:
    """The ``images`` field of a request -> float32 ``[B, 3, H, W]`` in [0, 1]."""
    fmt = field.get("format") if isinstance(field, dict) else None
    if fmt == "png":
        from PIL import Image

        arrays = []
        for item in field.get("data", []):
            with Image.open(io.BytesIO(base64.b64decode(item))) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        if not arrays:
            raise ValueError("the request has no images.")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all images of a request must have one size; got {sorted(shapes)}.")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    if fmt in ("npz", "npz32"):
        with np.load(io.BytesIO(base64.b64decode(field.get("data", ""))), allow_pickle=False) as archive:
            array = archive["images"]
        if fmt == "npz":
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"npz images must be uint8 [B, H, W, 3]; got {array.dtype} {array.shape}.")
            return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
        if array.dtype != np.float32 or array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"npz32 images must be float32 [B, 3, H, W]; got {array.dtype} {array.shape}.")
        return torch.from_numpy(array)
    raise ValueError(f"images.format must be one of {FORMATS}; got {fmt!r}.")


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
            with backoff. Bounds the server's threads and memory under a burst.
    """

    daemon_threads = True

    def __init__(
        self,
        reward,
        name: str,
        address: tuple[str, int] = ("127.0.0.1", 0),
        max_request_mb: float = 512,
        max_pending: int = 32,
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1; got {max_pending}.")
        self.reward = reward
        self.reward_name = name
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.max_pending = max_pending
        self.pending = threading.BoundedSemaphore(max_pending)
        self.lock = threading.Lock()
        self.busy_replies = 0  # requests answered 503 because max_pending were already in
        self._count_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def parse(self, request: dict) -> tuple[torch.Tensor, list[str], list[dict]]:
        """A request's images, prompts and metadata; ``ValueError`` says what is wrong with it."""
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("'prompts' must be a list of strings.")
        images = decode_images(request.get("images"))
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

    def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise in training logs
        return

    def _reply(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout) before the answer
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
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_request_bytes:
            self._reply(413, {"error": f"request of {length} bytes is over the server's limit; send smaller batches."})
            return
        if not self.server.pending.acquire(blocking=False):
            self.rfile.read(length)
            with self.server._count_lock:
                self.server.busy_replies += 1
            self._reply(503, {"error": f"busy: {self.server.max_pending} requests are already pending; retry later."})
            return
        try:
            self._score(length)
        finally:
            self.server.pending.release()

    def _score(self, length: int) -> None:
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise ValueError("the request body must be a JSON object.")
            images, prompts, metadata = self.server.parse(request)
        except (ValueError, KeyError, OSError) as error:
            self._reply(400, {"error": f"bad request: {error}"})
            return
        try:
            scores = self.server.score(images, prompts, metadata)
        except Exception as error:  # the reward itself failed: report it, keep serving
            self._reply(500, {"error": f"reward {self.server.reward_name!r} raised {type(error).__name__}: {error}"})
            return
        self._reply(200, {"scores": scores})


def serve(
    reward, name: str, host: str = "127.0.0.1", port: int = 0, max_request_mb: float = 512, max_pending: int = 32
) -> RewardServer:
    """Start serving ``reward`` in a background thread; returns the server (``.url``; ``.shutdown()`` stops it)."""
    server = RewardServer(reward, name, (host, port), max_request_mb, max_pending)
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
            request = urllib.request.Request(
                f"{self.url}/score", data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code not in (502, 503, 504):
                    raise RuntimeError(f"reward server {self.url} answered {error.code}: {message}") from None
                last_error, busy = f"{error.code}: {message}", error.code == 503
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                last_error, busy = str(reason), False
                timed_out = isinstance(reason, TimeoutError) or "timed out" in last_error
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
        with urllib.request.urlopen(f"{self.url}/health", timeout=self.timeout) as response:
            return json.loads(response.read())

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
            batch = reply.get("scores")
            if not isinstance(batch, list) or len(batch) != len(body["prompts"]):
                raise RuntimeError(f"reward server {self.url} sent {batch!r} instead of one score per image.")
            scores.extend(math.nan if value is None else float(value) for value in batch)
        return torch.tensor(scores, dtype=torch.float32)


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", error.reason)
    except (ValueError, AttributeError):
        return str(error.reason)


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
    args = parser.parse_args(argv)
    from diffrl.rewards.registry import build_reward

    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--kwargs must be a JSON object")
        reward = build_reward(args.reward, **kwargs)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"{prog}: {error}")
        return 2
    run_forever(RewardServer(reward, args.reward, (args.host, args.port), args.max_request_mb, args.max_pending))
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
