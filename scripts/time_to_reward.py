"""Held-out reward against wall time and against images sampled, per method, and each method's time to reach the
reference method's final reward.

    python scripts/time_to_reward.py --method grpo=runs/grpo_s0,runs/grpo_s1,runs/grpo_s2 \\
        --method nft=runs/nft_s0,runs/nft_s1 --method draft=runs/draft_s0 [--metric eval/shapes/ode/mean]
        [--reference grpo] [--plot docs/images/time_to_reward.png]

Reads each run's ``metrics.jsonl``: the in-training evaluations of ``--metric`` (the same held-out prompts and
noise in every run of the same eval settings) after each evaluated epoch, the run's own sampling and training
seconds up to that epoch (evaluation time left out) and the images it sampled (``sample.batch_size`` x
``sample.num_batches_per_epoch`` x processes an epoch). Per method the curves are averaged over its runs at the
epochs they share. The reference's final reward is the mean over its runs of their last evaluation; a run
reaches it at the first evaluation at or above it, interpolated linearly from the one before. The ratio is a
method's mean time (and images) to reach it over the reference's own. Times are this machine's, with whatever else
ran beside each run: compare runs measured under the same load, and read the images ratio beside it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def curve(run: Path, metric: str) -> dict[str, list[float]]:
    """Epochs evaluated, the metric there, and the cumulative training seconds and images at each."""
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    states = sorted(run.glob("checkpoints/epoch-*/trainer_state.json"))
    processes = json.loads(states[-1].read_text()).get("num_processes", 1) if states else 1
    per_epoch = config["sample"]["batch_size"] * config["sample"]["num_batches_per_epoch"] * processes
    seconds, out = 0.0, {"epoch": [], "value": [], "seconds": [], "images": []}
    for row in sorted(rows, key=lambda r: r["epoch"]):
        seconds += sum(v for k, v in row.items() if k.startswith("time/") and k != "time/eval_s")
        if metric in row:
            out["epoch"].append(row["epoch"])
            out["value"].append(row[metric])
            out["seconds"].append(seconds)
            out["images"].append(row["epoch"] * per_epoch)
    if not out["epoch"]:
        raise SystemExit(f"{run}/metrics.jsonl has no {metric!r}; is it a metric the run evaluated?")
    return out


def reach(c: dict[str, list[float]], target: float, axis: str) -> float:
    """The first ``axis`` value (seconds or images) at which the curve reaches ``target``; inf if it never does."""
    for i, value in enumerate(c["value"]):
        if value >= target:
            if i == 0:
                return c[axis][0]
            v0, x0, x1 = c["value"][i - 1], c[axis][i - 1], c[axis][i]
            return x0 + (target - v0) / (value - v0) * (x1 - x0)
    return math.inf


def mean_curve(curves: list[dict]) -> dict[str, np.ndarray]:
    epochs = sorted(set.intersection(*(set(c["epoch"]) for c in curves)))
    out = {"epoch": np.array(epochs)}
    for key in ("value", "seconds", "images"):
        table = np.array([[c[key][c["epoch"].index(e)] for e in epochs] for c in curves])
        out[key], out[f"{key}_se"] = (
            table.mean(0),
            (table.std(0, ddof=1) / len(curves) ** 0.5 if len(curves) > 1 else 0 * table[0]),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", required=True, help="NAME=RUN[,RUN...] (repeat per method)")
    parser.add_argument("--metric", default="eval/shapes/ode/mean")
    parser.add_argument(
        "--reference", default=None, help="the method whose final reward is the target (default: first)"
    )
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    methods = {}
    for spec in args.method:
        name, _, runs = spec.partition("=")
        if not runs:
            raise SystemExit(f"--method {spec!r}: write NAME=RUN[,RUN...].")
        methods[name] = [curve(Path(r), args.metric) for r in runs.split(",")]
    reference = args.reference or next(iter(methods))
    if reference not in methods:
        raise SystemExit(f"--reference {reference!r} is not one of the methods ({', '.join(methods)}).")
    target = float(np.mean([c["value"][-1] for c in methods[reference]]))
    ref_time = np.mean([reach(c, target, "seconds") for c in methods[reference]])
    ref_images = np.mean([reach(c, target, "images") for c in methods[reference]])
    print(f"{args.metric}; target: {reference}'s final, {target:.3f} (mean of {len(methods[reference])} runs)\n")
    print("| method | runs | base | final | minutes (training) | to reach the target: minutes | images | time ratio | "
          "images ratio |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, curves in methods.items():
        times = [reach(c, target, "seconds") for c in curves]
        images = [reach(c, target, "images") for c in curves]
        reached = sum(math.isfinite(t) for t in times)
        final = np.mean([c["value"][-1] for c in curves])
        base = np.mean([c["value"][0] for c in curves])
        total = np.mean([c["seconds"][-1] for c in curves]) / 60
        if reached == len(curves):
            t, n = np.mean(times), np.mean(images)
            cells = f"{t / 60:.1f} | {n:.0f} | {t / ref_time:.2f} | {n / ref_images:.2f}"
        else:
            cells = f"{reached} of {len(curves)} runs reach it | | |"
        print(f"| {name} | {len(curves)} | {base:.3f} | {final:.3f} | {total:.1f} | {cells} |")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for name, curves in methods.items():
            m = mean_curve(curves)
            for ax, key, scale in ((axes[0], "seconds", 60), (axes[1], "images", 1)):
                ax.errorbar(m[key] / scale, m["value"], yerr=m["value_se"], marker="o", capsize=3,
                            label=f"{name} ({len(curves)} runs)")  # fmt: skip
        for ax in axes:
            ax.axhline(target, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        axes[0].set_xlabel("training minutes (sampling and updates)")
        axes[1].set_xlabel("images sampled")
        axes[0].set_ylabel(args.metric.removeprefix("eval/"))
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
