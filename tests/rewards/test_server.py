import base64
import contextlib
import io
import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl.rewards import RewardError, build_reward, weighted_sum
from diffrl.rewards.server import RemoteReward, decode_images, encode_images, serve
from diffrl.rewards.server import main as serve_main

REPO = Path(__file__).resolve().parents[2]


def images(batch: int = 5) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 12, generator=torch.Generator().manual_seed(0))


def weighted_pixels(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Depends on every pixel, the prompt and the metadata, so a mix-up in transport changes the score."""
    weights = torch.linspace(0.5, 1.5, images[0].numel()).view_as(images[0])
    extra = torch.tensor([len(p) + m["k"] for p, m in zip(prompts, metadata, strict=True)])
    return (images * weights).sum(dim=(1, 2, 3)) + extra


@pytest.fixture
def server():
    server = serve(weighted_pixels, "weighted_pixels")
    yield server
    server.shutdown()
    server.server_close()


def test_png_and_npz_round_trip_images():
    x = images()
    exact = decode_images(json.loads(json.dumps(encode_images(x, "npz32"))))
    assert torch.equal(exact, x)
    quantised = (x * 255).round() / 255
    for fmt in ("png", "npz"):
        torch.testing.assert_close(decode_images(encode_images(x, fmt)), quantised, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["png", "npz", "npz32"])
def test_remote_scores_equal_in_process_scores(server, fmt):
    x, prompts = images(), ["a", "bb", "ccc", "d", "ee"]
    metadata = [{"k": i} for i in range(5)]
    remote = RemoteReward(server.url, batch_size=2, image_format=fmt)  # three requests, the last one short
    sent = x if fmt == "npz32" else (x * 255).round() / 255
    torch.testing.assert_close(remote(x, prompts, metadata), weighted_pixels(sent, prompts, metadata))
    assert remote.health() == {"status": "ok", "reward": "weighted_pixels", "protocol": 1}


def test_url_spec_goes_through_weighted_sum(server):
    mix = weighted_sum({server.url: 2.0}, kwargs={server.url: {"image_format": "npz32"}})
    metadata = [{"k": 0}] * 5
    out = mix.score(images(), ["p"] * 5, metadata)
    torch.testing.assert_close(out.total, 2 * weighted_pixels(images(), ["p"] * 5, metadata))
    assert out.parts.keys() == {"remote"}  # a stable name: no port in the metric key


def test_non_finite_scores_arrive_as_nan_and_are_caught():
    def half_nan(images, prompts, metadata):
        return torch.tensor([math.nan, 1.0])

    server = serve(half_nan, "half_nan")
    try:
        remote = RemoteReward(server.url)
        assert torch.isnan(remote(images(2), ["a", "b"])).tolist() == [True, False]
        with pytest.raises(RewardError, match="non-finite scores for samples \\[0\\]"):
            weighted_sum({server.url: 1.0}).score(images(2), ["a", "b"])
        dropped = weighted_sum({server.url: 1.0}, on_invalid="drop").score(images(2), ["a", "b"])
        assert dropped.valid.tolist() == [False, True]
    finally:
        server.shutdown()
        server.server_close()


def test_reward_errors_and_bad_shapes_are_reported_not_retried():
    calls = []

    def broken(images, prompts, metadata):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("model not loaded")
        return torch.zeros(len(prompts) + 1)

    server = serve(broken, "broken")
    try:
        remote = RemoteReward(server.url, retries=3, backoff=0)
        with pytest.raises(RuntimeError, match="answered 500: reward 'broken' raised ValueError: model not loaded"):
            remote(images(2), ["a", "b"])
        with pytest.raises(RuntimeError, match=r"returned shape \(3,\) for 2 images"):
            remote(images(2), ["a", "b"])
        assert len(calls) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_bad_requests_get_400(server):
    request = urllib.request.Request(
        f"{server.url}/score", data=json.dumps({"prompts": ["a"], "images": {"format": "gif"}}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert "images.format must be one of" in json.loads(caught.value.read())["error"]


def test_server_down_fails_clearly_after_retries():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, timeout=5)
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"did not answer after 3 attempts.*diffrl serve-reward"):
        remote(images(1), ["a"])
    assert time.perf_counter() - started < 5


def test_timeout_is_enforced_and_retried():
    calls = []

    def slow(images, prompts, metadata):
        calls.append(1)
        time.sleep(1.0)
        return torch.zeros(len(prompts))

    server = serve(slow, "slow")
    try:
        with pytest.raises(ConnectionError, match="did not answer after 2 attempts"):
            RemoteReward(server.url, timeout=0.2, retries=1, backoff=0)(images(1), ["a"])
    finally:
        time.sleep(1.2)  # let the handler threads finish before the server goes
        server.shutdown()
        server.server_close()
    assert len(calls) == 2


def test_client_rejects_bad_settings():
    with pytest.raises(ValueError, match="must start with http"):
        build_reward("remote", url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="image_format must be one of"):
        RemoteReward("http://127.0.0.1:1", image_format="jpeg")


def test_serve_reward_command_serves_a_reward_file():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "rewards" / "serve.py"), f"{REPO}/rewards/example_reward.py:brightness",
         "--port", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "serving reward" in process.stdout.readline()
        remote = RemoteReward(f"http://127.0.0.1:{port}", image_format="npz32", retries=0)
        torch.testing.assert_close(remote(images(3), ["a"] * 3), images(3).mean(dim=(1, 2, 3)))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_reward_command_reports_an_unknown_reward():
    result = subprocess.run(
        [sys.executable, "-m", "diffrl.cli", "serve-reward", "pickscor", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown reward 'pickscor'" in result.stdout


def _soak(tmp_path, *args: str) -> dict:
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "scripts" / "soak_reward_server.py"), "--json", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_soak_a_burst_beyond_the_servers_slots_is_answered_with_retries(tmp_path):
    figures = _soak(tmp_path, "--clients", "8", "--requests", "3", "--max-pending", "2", "--retries", "12")
    assert figures["answered"] == figures["requests"] == 24
    assert figures["failed"] == 0 and figures["wrong_scores"] == 0
    assert figures["busy_replies"] > 0  # the overflow was turned away (503) and retried, not queued without bound
    assert figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"] <= figures["latency_ms"]["max"]


def test_soak_without_retries_fails_the_overflow_clearly(tmp_path):
    figures = _soak(tmp_path, "--clients", "8", "--requests", "3", "--max-pending", "1", "--retries", "0")
    assert figures["answered"] + figures["failed"] == figures["requests"]
    assert figures["failed"] > 0 and figures["wrong_scores"] == 0
    assert all("busy" in message and "--max-pending" in message for message in figures["failures"])


# --------------------------------------------------------------------------------------------------------------------
# hostile input: bounded memory, 400 for malformed requests, no thread or slot held by a slow client


def _raw(server, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the server and return everything it answers before closing."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _post_raw(server, body: bytes, headers: str = "") -> tuple[int, str]:
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode()
    answer = _raw(server, head + body).decode(errors="replace")
    status = int(answer.split()[1])
    return status, answer.split("\r\n\r\n", 1)[-1]


def _png_bomb(side: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG", optimize=True)  # a few kB that decode to side^2 bytes
    return base64.b64encode(buffer.getvalue()).decode()


def _npz(array) -> str:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=array)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def guarded():
    server = serve(lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)), "mean", max_pending=2)
    server.read_timeout = 1.0
    yield server
    server.shutdown()
    server.server_close()


def test_decompression_bombs_are_refused_before_decoding(guarded):
    png = json.dumps({"prompts": ["a"], "images": {"format": "png", "data": [_png_bomb(12000)]}}).encode()
    assert len(png) < 200_000
    status, body = _post_raw(guarded, png)
    assert status == 400 and "pixels" in body
    big = np.zeros((1, 12000, 12000, 3), dtype=np.uint8)  # 432 MB as an array, ~420 kB compressed
    npz = json.dumps({"prompts": ["a"], "images": {"format": "npz", "data": _npz(big)}}).encode()
    del big
    status, body = _post_raw(guarded, npz)
    assert status == 400 and "uncompressed" in body


@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        (b"{}", "Content-Length: abc\r\n", "Content-Length must be a non-negative integer"),
        (json.dumps({"prompts": ["a"], "images": {"format": "npz", "data": ""}}).encode(), "", "npz archive"),
        (b"[" * 200_000 + b"]" * 200_000, "", "nested too deeply"),
        (b"\xff\xfe not json", "", "bad request"),
    ],
    ids=["length not a number", "npy or nothing sent as npz", "JSON nested 200,000 deep", "not JSON"],
)
def test_malformed_requests_get_400_not_a_dropped_connection(guarded, body, headers, needle):
    if "Content-Length: abc" in headers:
        answer = _raw(guarded, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}").decode()
        status, text = int(answer.split()[1]), answer
    else:
        status, text = _post_raw(guarded, body)
    assert status == 400 and needle in text
    assert RemoteReward(guarded.url, retries=0)(images(1), ["a"]).shape == (1,)  # still serving


def test_a_numpy_file_sent_as_npz_is_a_400(guarded):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 4, 4, 3), dtype=np.uint8))
    data = base64.b64encode(buffer.getvalue()).decode()
    status, body = _post_raw(
        guarded, json.dumps({"prompts": ["a"], "images": {"format": "npz", "data": data}}).encode()
    )
    assert status == 400 and "must be an .npz archive" in body


def test_slow_and_idle_clients_are_cut_off_and_hold_no_slot(guarded):
    host, port = guarded.server_address[:2]
    slow = []
    for _ in range(6):  # more than max_pending, each sending its headers and one byte of a long body
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        slow.append(sock)
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(10)]
    started = time.monotonic()
    scores = RemoteReward(guarded.url, retries=5, backoff=0.3)(images(1), ["a"])  # answered despite them
    assert scores.shape == (1,) and time.monotonic() - started < 10
    time.sleep(1.5)  # past the read timeout: every one of them was closed by the server
    for sock in slow + idle:
        sock.settimeout(2)
        with contextlib.suppress(ConnectionResetError):  # a reset, or the end of the stream: the server hung up
            assert sock.recv(1024) == b""
        sock.close()


def test_connections_past_the_limit_get_503_and_no_thread():
    server = serve(lambda i, p, m: torch.zeros(len(p)), "zero", max_pending=1, max_connections=2)
    host, port = server.server_address[:2]
    try:
        held = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        threads = threading.active_count()
        answer = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and threading.active_count() <= threads + 1
        for sock in held:
            sock.close()
    finally:
        server.shutdown()
        server.server_close()
    assert server.refused_connections >= 1


def _fake_server(reply: bytes, trickle: float = 0.0):
    """A one-shot server on loopback that answers ``reply``, a byte every ``trickle`` seconds if set."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for i in range(len(reply)) if trickle else [None]:
                if i is None:
                    conn.sendall(reply)
                else:
                    try:
                        conn.sendall(reply[i : i + 1])
                    except OSError:
                        return
                    time.sleep(trickle)
        listener.close()

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def _http(body: bytes) -> bytes:
    return b"HTTP/1.0 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize("scores", [["0.5"], [True], [{"x": 1}]], ids=["string", "boolean", "object"])
def test_the_client_accepts_only_numbers_as_scores(scores):
    url = _fake_server(_http(json.dumps({"scores": scores}).encode()))
    with pytest.raises(RuntimeError, match="instead of one number \\(or null\\) per image"):
        RemoteReward(url, retries=0)(images(1), ["a"])


def test_the_client_timeout_is_a_deadline_for_the_whole_answer():
    url = _fake_server(_http(json.dumps({"scores": [0.5]}).encode()), trickle=0.2)  # ~6 s to send in all
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="timed out"):
        RemoteReward(url, timeout=1.0, retries=0)(images(1), ["a"])
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "--port must be in 0-65535"),
        (["--max-pending", "0"], "--max-pending must be >= 1"),
        (["--max-request-mb", "-1"], "--max-request-mb must be > 0"),
    ],
)
def test_serve_reward_rejects_bad_settings_in_one_line(args, message, capsys):
    assert serve_main(["shapes", *args]) == 2
    out = capsys.readouterr().out
    assert message in out and "Traceback" not in out


def test_serve_reward_on_a_port_in_use_says_so(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert serve_main(["shapes", "--port", str(port)]) == 2
    out = capsys.readouterr().out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "pick another --port" in out


def test_a_server_refuses_a_negative_request_limit():
    with pytest.raises(ValueError, match="max_request_mb must be a positive number"):
        serve(lambda i, p, m: torch.zeros(len(p)), "zero", max_request_mb=-1)
