import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from diffrl.rewards import RewardError, build_reward, weighted_sum
from diffrl.rewards.server import RemoteReward, decode_images, encode_images, serve

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
    assert out.parts.keys() == {server.url}


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
