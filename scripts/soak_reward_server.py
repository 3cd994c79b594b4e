"""Soak a reward server: a burst of concurrent client batches on loopback; every request is answered or fails clearly.

    python scripts/soak_reward_server.py [--clients 16] [--requests 8] [--batch 8] [--size 64]
        [--reward jpeg_compressibility] [--delay-ms 20] [--max-pending 8] [--retries 5] [--json out.json]

It starts ``diffrl.rewards.server.serve`` on 127.0.0.1 (never another interface), then ``--clients`` threads each send
``--requests`` batches through :class:`~diffrl.rewards.server.RemoteReward` at once. A server with fewer pending slots
than clients answers the overflow 503 (busy) and the clients retry with backoff. Prints requests, answers, failures
(with their messages), latency percentiles and throughput, and checks each answer against in-process scoring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from diffrl.rewards import build_reward
from diffrl.rewards.server import RemoteReward, serve


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="batches per client")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="extra time the reward takes per batch")
    parser.add_argument("--max-pending", type=int, default=8)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    scorer = build_reward(args.reward)

    def reward(images, prompts, metadata):
        time.sleep(args.delay_ms / 1000)
        return scorer(images, prompts, metadata)

    server = serve(reward, args.reward, host="127.0.0.1", max_pending=args.max_pending)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    mismatches = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        remote = RemoteReward(server.url, timeout=args.timeout, retries=args.retries, backoff=0.05)
        generator = torch.Generator().manual_seed(index)
        for r in range(args.requests):
            images = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
            prompts = [f"client {index} request {r} image {i}" for i in range(args.batch)]
            started = time.perf_counter()
            try:
                scores = remote(images, prompts)
            except Exception as error:  # counted and reported: the soak is about failing clearly
                with lock:
                    failures[f"{type(error).__name__}: {error}"] += 1
                continue
            elapsed = time.perf_counter() - started
            expected = scorer(images, prompts, [{} for _ in prompts])
            with lock:
                latencies.append(elapsed)
                mismatches[0] += int(not torch.allclose(scores, expected.float(), atol=1e-5))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server.shutdown()
    server.server_close()

    total = args.clients * args.requests
    figures = {
        "requests": total,
        "answered": len(latencies),
        "failed": sum(failures.values()),
        "wrong_scores": mismatches[0],
        "busy_replies": server.busy_replies,
        "latency_ms": {
            "p50": 1000 * percentile(latencies, 50),
            "p90": 1000 * percentile(latencies, 90),
            "p99": 1000 * percentile(latencies, 99),
            "max": 1000 * max(latencies, default=float("nan")),
            "mean": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
        },
        "wall_s": wall,
        "images_per_s": len(latencies) * args.batch / wall,
        "failures": dict(failures),
        "settings": vars(args) | {"json": str(args.json)},
    }
    print(
        f"{total} requests ({args.clients} clients x {args.requests}, {args.batch} images of {args.size}px, "
        f"max_pending {args.max_pending}, retries {args.retries}): {len(latencies)} answered, "
        f"{figures['failed']} failed, {mismatches[0]} wrong scores, {server.busy_replies} busy (503) replies"
    )
    lat = figures["latency_ms"]
    print(
        f"latency ms: p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}; "
        f"{figures['images_per_s']:.0f} images/s over {wall:.2f} s"
    )
    for message, count in failures.most_common():
        print(f"  {count} x {message}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
