"""A report people want to look at: ``diffrl report RUN_OR_SWEEP_DIR`` writes ``<dir>/report/report.md`` with PNGs.

For a run: reward curves (training SDE reward; held-out ODE and SDE reward with standard errors), the ODE − SDE
gap over training, and the ODE-vs-SDE image grids saved at every evaluation (fixed prompts and seeds; rows: etas).
For a sweep (a folder with ``sweep.json``): the eta-sweep chart (ODE, SDE and gap against the training eta, error
bars over seeds), held-out ODE reward and gap over training per eta (mean over seeds), the sweep table, and the
image grids of one run per eta. The folder is self-contained: the page and every image it shows.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

GRIDS_SHOWN = 5  # image grids per run, spread over training (first and last always)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("diffrl report draws with matplotlib: pip install 'diffrl[logging]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl; give a run folder or a sweep folder.")
    rows, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1  # a write cut short by a kill; a resumed run drops such lines itself
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
        else:
            torn += 1
    if torn:
        print(f"{path}: skipped {torn} line(s) that are not whole metrics records (a write cut short by a kill).")
    return rows


def eval_names(metrics: list[dict]) -> tuple[str | None, list[float]]:
    """The reported reward (``total`` of a mix, else the only part) and the evaluated etas."""
    names, etas = set(), set()
    for record in metrics:
        for key in record:
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "eval" and parts[2].startswith("eta=") and parts[3] == "mean":
                names.add(parts[1])
                etas.add(float(parts[2].removeprefix("eta=")))
    if not names:
        return None, []
    return ("total" if "total" in names else sorted(names)[0]), sorted(etas)


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in metrics if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(metrics: list[dict], out: Path, title: str) -> list[tuple[str, str]]:
    """Reward curves and the gap over training; returns ``(file name, caption)`` pairs."""
    plt = _pyplot()
    figures = []
    name, etas = eval_names(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = _series(metrics, "reward/mean")
    if x:
        ax.plot(x, y, color="0.6", lw=1, label="training samples (SDE, training prompts)")
    for eta in etas:
        x, y = _series(metrics, f"eval/{name}/eta={eta:g}/mean")
        _, se = _series(metrics, f"eval/{name}/eta={eta:g}/stderr")
        label = "held-out ODE (eta = 0)" if eta == 0 else f"held-out SDE (eta = {eta:g})"
        ax.errorbar(x, y, yerr=se if len(se) == len(y) else None, marker="o", capsize=3, label=label)
    ax.set(xlabel="epoch", ylabel=f"{name or 'reward'}", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=120)
    plt.close(fig)
    figures.append(("rewards.png", "Reward over training: training samples and held-out prompts, ODE and SDE."))
    x, y = _series(metrics, f"eval/{name}/gap")
    if x:
        _, se = _series(metrics, f"eval/{name}/gap_stderr")
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.axhline(0, color="0.7", lw=1)
        ax.errorbar(x, y, yerr=se if len(se) == len(y) else None, marker="o", capsize=3)
        ax.set(xlabel="epoch", ylabel="ODE − SDE", title=f"{title}: gap on held-out prompts (same noise)")
        fig.tight_layout()
        fig.savefig(out / "gap.png", dpi=120)
        plt.close(fig)
        figures.append(("gap.png", "The ODE − SDE reward gap over training (paired, ± standard error)."))
    return figures


def copy_grids(run: Path, out: Path, prefix: str) -> list[tuple[str, str]]:
    """Up to GRIDS_SHOWN evaluation grids of a run, spread over training, copied into the report."""
    grids = sorted((run / "samples").glob("epoch-*.png"))
    if len(grids) > GRIDS_SHOWN:
        picks = sorted({round(i * (len(grids) - 1) / (GRIDS_SHOWN - 1)) for i in range(GRIDS_SHOWN)})
        grids = [grids[i] for i in picks]
    shown = []
    for grid in grids:
        name = f"{prefix}{grid.name}"
        shutil.copyfile(grid, out / name)
        epoch = int(grid.stem.removeprefix("epoch-"))
        shown.append((name, f"after {epoch} epochs: rows are the evaluated etas (ODE first), columns fixed prompts"))
    return shown


def _markdown(title: str, sections: list[tuple[str, list[tuple[str, str]] | str]]) -> str:
    lines = [f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", ""]
        if isinstance(body, str):
            lines += [body, ""]
            continue
        for file, caption in body:
            lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def run_report(run: Path, out: Path) -> Path:
    metrics = load_metrics(run)
    figures = plot_run(metrics, out, run.name)
    sections: list = [("Rewards", figures)]
    grids = copy_grids(run, out, "")
    if grids:
        sections.append(("ODE vs SDE samples across training", grids))
    path = out / "report.md"
    path.write_text(_markdown(f"diffrl run {run.name}", sections))
    return path


def sweep_report(sweep: Path, out: Path) -> Path:
    from diffrl.sweep import summarize

    plt = _pyplot()
    rows = summarize(sweep)
    sections: list = []
    figures = []
    for steps in sorted({r["steps"] for r in rows}):
        chosen = [r for r in rows if r["steps"] == steps]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        etas = [r["eta"] for r in chosen]
        for key, label in (("ode", "ODE (eta = 0)"), ("sde", "SDE (training eta)")):
            errors = [0 if math.isnan(r[f"{key}_stderr"]) else r[f"{key}_stderr"] for r in chosen]
            left.errorbar(etas, [r[f"{key}_mean"] for r in chosen], yerr=errors, marker="o", capsize=3, label=label)
        left.set(xlabel="training eta", ylabel=f"held-out {chosen[0]['reward']}", title=f"{steps} sampling steps")
        left.legend(fontsize=8)
        errors = [0 if math.isnan(r["gap_stderr"]) else r["gap_stderr"] for r in chosen]
        right.axhline(0, color="0.7", lw=1)
        right.errorbar(etas, [r["gap_mean"] for r in chosen], yerr=errors, marker="o", capsize=3, label="after")
        if all("base_gap_mean" in r for r in chosen):
            right.plot(etas, [r["base_gap_mean"] for r in chosen], "s--", color="0.5", label="before training")
            right.legend(fontsize=8)
        right.set(xlabel="training eta", ylabel="ODE − SDE", title="gap (same noise)")
        fig.tight_layout()
        name = f"sweep-steps{steps}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        figures.append((name, f"Reward after training against the training eta, {steps} steps (± s.e. over seeds)."))
    sections.append(("The eta sweep", figures))
    sections.append(("Table", (sweep / "sweep.md").read_text()))
    sections.append(("Over training (mean over seeds)", _sweep_curves(sweep, out, plt)))
    for eta_dir in sorted(sweep.glob("eta=*")):
        runs = sorted(eta_dir.glob("seed=*"))
        if runs:
            grids = copy_grids(runs[0], out, f"{eta_dir.name}-{runs[0].name}-")
            if grids:
                sections.append((f"Samples, training {eta_dir.name.replace('=', ' = ')} ({runs[0].name})", grids))
    path = out / "report.md"
    path.write_text(_markdown(f"diffrl eta sweep {sweep.name}", sections))
    return path


def _sweep_curves(sweep: Path, out: Path, plt) -> list[tuple[str, str]]:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for eta_dir in sorted(sweep.glob("eta=*"), key=lambda p: float(p.name.removeprefix("eta="))):
        curves, gaps = {}, {}
        for run in sorted(eta_dir.glob("seed=*")):
            if not (run / "metrics.jsonl").is_file():
                continue
            metrics = load_metrics(run)
            name, _ = eval_names(metrics)
            for epoch, value in zip(*_series(metrics, f"eval/{name}/eta=0/mean"), strict=True):
                curves.setdefault(epoch, []).append(value)
            for epoch, value in zip(*_series(metrics, f"eval/{name}/gap"), strict=True):
                gaps.setdefault(epoch, []).append(value)
        label = eta_dir.name.replace("=", " = ")
        if curves:
            left.plot(sorted(curves), [sum(curves[e]) / len(curves[e]) for e in sorted(curves)], "o-", label=label)
        if gaps:
            right.plot(sorted(gaps), [sum(gaps[e]) / len(gaps[e]) for e in sorted(gaps)], "o-", label=label)
    left.set(xlabel="epoch", ylabel="held-out ODE reward", title="ODE reward")
    right.axhline(0, color="0.7", lw=1)
    right.set(xlabel="epoch", ylabel="ODE − SDE", title="gap")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep-training.png", dpi=120)
    plt.close(fig)
    return [("sweep-training.png", "Held-out ODE reward and ODE − SDE gap over training, per training eta.")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffrl report", description=__doc__)
    parser.add_argument("directory", type=Path, help="a run folder (metrics.jsonl) or a sweep folder (sweep.json)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <directory>/report)")
    args = parser.parse_args(argv)
    out = args.out or args.directory / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if (args.directory / "sweep.json").is_file():
            path = sweep_report(args.directory, out)
        else:
            path = run_report(args.directory, out)
    except (FileNotFoundError, ImportError) as error:
        print(f"diffrl report: {error}")
        return 2
    print(f"report: {path}")
    return 0
