"""Run a reward in another process, environment, GPU or host, and score against it over HTTP.

:func:`serve` wraps any reward callable in a :class:`RewardServer`; ``diffrl serve-reward`` (:func:`main`) serves a
registry reward or a user's function. The protocol and the client, :class:`~diffrl.rewards.remote.RemoteReward`,
live in :mod:`diffrl.rewards.remote`. The server binds to 127.0.0.1 unless told otherwise: it runs no
authentication.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from diffrl.rewards.combine import check_scores
from diffrl.rewards.registry import build_reward
from diffrl.rewards.remote import MAX_PIXELS, PROTOCOL, RemoteReward, decode_images, encode_images

__all__ = ["RemoteReward", "RewardServer", "decode_images", "encode_images", "main", "serve"]

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
