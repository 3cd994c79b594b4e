"""The client side of a reward server (:mod:`diffrl.rewards.server`): the wire format of images and
:class:`RemoteReward`, a reward like any other (registry name ``remote``, or the server's URL as the reward spec).

Protocol (JSON over HTTP; nothing is ever unpickled):

- ``GET /health`` -> ``{"status": "ok", "reward": NAME, "protocol": 1}``
- ``POST /score`` with ``{"prompts": [...], "metadata": [{...}, ...], "images": IMAGES}`` ->
  ``{"scores": [float | null, ...]}`` (``null`` for a non-finite score), or an error status with ``{"error": MSG}``.

``IMAGES`` is ``{"format": "png", "data": [base64 PNG, ...]}`` (8-bit, what any reward sees from a saved image),
``{"format": "npz", "data": base64 .npz}`` with a uint8 ``images`` array ``[B, H, W, 3]``, or ``"npz32"``: the same
with float32 ``[B, 3, H, W]`` in [0, 1], exact.
"""

from __future__ import annotations

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

import numpy as np
import torch

from diffrl.rewards.combine import to_uint8

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
