"""A report people want to look at: ``diffrl report RUN_OR_SWEEP_DIR`` writes ``<dir>/report/report.html`` (one
self-contained page, every image embedded: open it or send it) and ``report.md`` with the PNGs beside it.

For a run: its first and last numbers and config summary, reward curves against epochs and wall-clock time
(training samples; held-out ODE and training-sampler reward with standard errors), every part of a reward mix, the
ODE − training-sampler gap over training, the trainer's diagnostics (KL, clip fraction, ratio, gradient norm,
learning rate), and the labelled image grids saved at every evaluation (fixed prompts and seeds; rows: samplers).
For a sweep (a folder with ``sweep.json``): the eta-sweep chart (ODE, SDE and gap against the training eta, error
bars over seeds), held-out ODE reward and gap over training per eta (mean over seeds), the sweep table, and the
image grids of one run per eta. The folder is self-contained: the page and every image it shows.
"""

from __future__ import annotations

import argparse
import base64
import html
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


def _label_order(label: str) -> tuple[int, float]:
    if label == "ode":
        return 0, 0.0
    if label == "train_sampler":
        return 1, 0.0
    return 2, float(label.removeprefix("sde_eta="))


def eval_names(metrics: list[dict]) -> tuple[str | None, list[str]]:
    """The reported reward (``total`` of a mix, else the only part) and the evaluated samplers' labels (``ode``,
    ``train_sampler``, ``sde_eta=<x>``), in that order."""
    names, labels = set(), set()
    for record in metrics:
        for key in record:
            parts = key.split("/")
            if len(parts) != 4 or parts[0] != "eval" or parts[3] != "mean":
                continue
            if parts[2] in ("ode", "train_sampler") or parts[2].startswith("sde_eta="):
                names.add(parts[1])
                labels.add(parts[2])
    if not names:
        return None, []
    return ("total" if "total" in names else sorted(names)[0]), sorted(labels, key=_label_order)


LABEL_TEXT = {"ode": "held-out ODE (eta = 0)", "train_sampler": "held-out, the training sampler (SDE)"}


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in metrics if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def wall_minutes(metrics: list[dict]) -> dict[int, float]:
    """Minutes of work (sampling, training and evaluation, summed over resumed parts) after each logged epoch."""
    total, at = 0.0, {}
    for record in metrics:
        total += sum(v for k, v in record.items() if k.startswith("time/") and k.endswith("_s") and v is not None)
        at[record["epoch"]] = total / 60
    return at


def _integer_epochs(ax, metrics: list[dict] | None = None) -> None:
    """Whole-epoch ticks: every logged epoch when there are few (a one-epoch run gets its two points), else a
    locator that picks integers."""
    from matplotlib.ticker import MaxNLocator

    epochs = sorted({r["epoch"] for r in metrics or []})
    if 0 < len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


MARKERS = "osD^v<>p*h"
LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int) -> dict:
    """Distinct marker and line style per series, so overlapping lines stay told apart."""
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)], "markersize": 5}


def _reward_axes(ax, metrics: list[dict], name: str | None, labels: list[str], x_of) -> None:
    x, y = _series(metrics, "reward/mean")
    if x:
        ax.plot([x_of(e) for e in x], y, color="0.6", lw=1, marker=".", label="training samples (training prompts)")
    for i, key in enumerate(labels):
        x, y = _series(metrics, f"eval/{name}/{key}/mean")
        _, se = _series(metrics, f"eval/{name}/{key}/stderr")
        label = LABEL_TEXT.get(key, f"held-out SDE, every step (eta = {key.removeprefix('sde_eta=')})")
        ax.errorbar(
            [x_of(e) for e in x], y, yerr=se if len(se) == len(y) else None, capsize=3, label=label, **_style(i)
        )


def plot_run(metrics: list[dict], out: Path, title: str) -> list[tuple[str, str]]:
    """Reward curves against epochs and wall-clock time, every reward part of a mix, the gap over training, and the
    trainer's diagnostics; returns ``(file name, caption)`` pairs."""
    plt = _pyplot()
    figures = []
    name, labels = eval_names(metrics)
    minutes = wall_minutes(metrics)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _reward_axes(left, metrics, name, labels, lambda e: e)
    _reward_axes(right, metrics, name, labels, lambda e: minutes[e])
    left.set(xlabel="epoch", ylabel=f"{name or 'reward'}", title=title)
    right.set(xlabel="wall-clock minutes (sampling, training, evaluation)", ylabel=f"{name or 'reward'}")
    _integer_epochs(left, metrics)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=120)
    plt.close(fig)
    figures.append(("rewards.png", "Reward over training, against epochs and wall-clock time: training samples and "
                    "held-out prompts under each evaluated sampler (± standard error)."))  # fmt: skip
    parts = sorted({k.split("/")[1] for r in metrics for k in r if k.startswith("reward/") and k.count("/") == 2})
    if len(parts) > 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, part in enumerate(parts):
            x, y = _series(metrics, f"reward/{part}/mean")
            ax.plot(x, y, label=f"{part}: training samples", **_style(2 * i))
            x, y = _series(metrics, f"eval/{part}/ode/mean")
            if x:
                ax.plot(x, y, label=f"{part}: held-out ODE", **_style(2 * i + 1))
        ax.set(xlabel="epoch", ylabel="reward part", title=f"{title}: every part of the reward")
        _integer_epochs(ax, metrics)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "reward_parts.png", dpi=120)
        plt.close(fig)
        figures.append(("reward_parts.png", "Every part of the reward mix: training samples and held-out ODE (a part "
                        "of weight 0 is watched, not trained on: a verifier beside its learned proxy shows where the "
                        "proxy rises and the verifier does not)."))  # fmt: skip
    x, y = _series(metrics, f"eval/{name}/gap")
    if x:
        _, se = _series(metrics, f"eval/{name}/gap_stderr")
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.axhline(0, color="0.7", lw=1)
        ax.errorbar(x, y, yerr=se if len(se) == len(y) else None, marker="o", capsize=3)
        ax.set(xlabel="epoch", ylabel="ODE − training sampler", title=f"{title}: gap on held-out prompts (same noise)")
        _integer_epochs(ax, metrics)
        fig.tight_layout()
        fig.savefig(out / "gap.png", dpi=120)
        plt.close(fig)
        figures.append(("gap.png", "The reward gap ODE − training sampler over training (paired, ± standard error)."))
    shown = [(k, t) for k, t in DIAGNOSTICS if _series(metrics, k)[0]]
    if shown:
        columns = min(3, len(shown))
        rows = -(-len(shown) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 2.8 * rows), squeeze=False)
        for ax, (key, text) in zip(axes.flat, shown, strict=False):
            x, y = _series(metrics, key)
            ax.plot(x, y, marker="o", markersize=4)
            ax.set(title=text, xlabel="epoch")
            _integer_epochs(ax, [{"epoch": e} for e in x])
        for ax in list(axes.flat)[len(shown) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "diagnostics.png", dpi=110)
        plt.close(fig)
        figures.append(("diagnostics.png", "Trainer diagnostics per epoch (means over the epoch's updates)."))
    return figures


DIAGNOSTICS = (
    ("train/loss", "loss"),
    ("train/kl", "KL to the reference"),
    ("train/approx_kl", "approx. KL to the sampling policy"),
    ("train/clip_fraction", "clipped share of ratios"),
    ("train/ratio_max_abs_dev", "max |ratio − 1|"),
    ("train/grad_norm", "gradient norm (before clipping)"),
    ("train/lr", "learning rate"),
    ("train/advantage_abs_mean", "mean |advantage|"),
    ("reward/std", "reward std (training samples)"),
)


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
        caption = f"after {epoch} epochs: rows are the evaluated samplers (ODE first), columns fixed prompts"
        shown.append((name, caption))
    return shown


CONFIG_SUMMARY = (
    "model.family", "model.path", "train.algorithm", "train.epochs", "train.lr", "train.seed", "lora.rank",
    "sample.eta", "sample.sde_window", "sample.num_steps", "sample.guidance_scale", "sample.batch_size",
    "sample.num_batches_per_epoch", "train.group_size", "reward.spec", "prompts.train", "eval.num_steps",
)  # fmt: skip


def final_numbers(run: Path, metrics: list[dict]) -> str:
    """A markdown table of the run's numbers before and after training and its config summary."""
    name, labels = eval_names(metrics)
    keys = ["reward/mean"] + [f"eval/{name}/{label}/mean" for label in labels] + [f"eval/{name}/gap"]
    lines = ["| metric | first | last |", "|---|---|---|"]
    for key in keys:
        x, y = _series(metrics, key)
        if x:
            lines.append(f"| `{key}` | {y[0]:.4f} (epoch {x[0]}) | {y[-1]:.4f} (epoch {x[-1]}) |")
    minutes = wall_minutes(metrics)
    if metrics:
        lines.append(f"| epochs logged | {metrics[0]['epoch']} | {metrics[-1]['epoch']} |")
        lines.append(f"| wall-clock minutes of work | | {minutes[metrics[-1]['epoch']]:.1f} |")
    path = run / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        lines += ["", "| config | value |", "|---|---|"]
        for dotted in CONFIG_SUMMARY:
            section, key = dotted.split(".")
            if key in config.get(section, {}):
                lines.append(f"| `{dotted}` | `{config[section][key]}` |")
    return "\n".join(lines)


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


def _html_table(markdown: str) -> str:
    """The markdown tables of this module (and ``sweep.md``'s) as HTML; other lines become paragraphs."""
    out, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def _inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(title: str, sections: list[tuple[str, list[tuple[str, str]] | str]], out: Path) -> str:
    """One self-contained page: every image embedded (base64), each figure named by ``data-figure``."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, str):
            body.append(_html_table(content))
            continue
        for file, caption in content:
            data = base64.b64encode((out / file).read_bytes()).decode()
            body.append(
                f'<figure data-figure="{html.escape(file)}"><img alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;image-rendering:pixelated}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        "code{font-size:.9em}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _write(out: Path, title: str, sections: list) -> Path:
    (out / "report.html").write_text(_html(title, sections, out), encoding="utf-8")
    path = out / "report.md"
    path.write_text(_markdown(title, sections), encoding="utf-8")
    return path


def run_report(run: Path, out: Path) -> Path:
    metrics = load_metrics(run)
    figures = plot_run(metrics, out, run.name)
    sections: list = [("Final numbers", final_numbers(run, metrics)), ("Rewards and diagnostics", figures)]
    grids = copy_grids(run, out, "")
    if grids:
        sections.append(("ODE vs the training sampler across training", grids))
    return _write(out, f"diffrl run {run.name}", sections)


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
        for i, (key, label) in enumerate(SWEEP_SERIES):
            if not all(f"{key}_mean" in r for r in chosen):
                continue
            errors = [0 if math.isnan(r[f"{key}_stderr"]) else r[f"{key}_stderr"] for r in chosen]
            means = [r[f"{key}_mean"] for r in chosen]
            left.errorbar(etas, means, yerr=errors, capsize=3, label=label, **_style(i))
        left.set(xlabel="training eta", ylabel=f"held-out {chosen[0]['reward']}", title=f"{steps} sampling steps")
        left.legend(fontsize=8)
        errors = [0 if math.isnan(r["gap_stderr"]) else r["gap_stderr"] for r in chosen]
        right.axhline(0, color="0.7", lw=1)
        right.errorbar(etas, [r["gap_mean"] for r in chosen], yerr=errors, capsize=3, label="after", **_style(0))
        if all("base_gap_mean" in r for r in chosen):
            right.plot(etas, [r["base_gap_mean"] for r in chosen], color="0.5", label="before training", **_style(1))
            right.legend(fontsize=8)
        right.set(xlabel="training eta", ylabel="ODE − SDE", title="gap (same noise)")
        for ax in (left, right):
            ax.set_xticks(sorted(set(etas)))
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
    return _write(out, f"diffrl eta sweep {sweep.name}", sections)


SWEEP_SERIES = (("ode", "ODE (eta = 0)"), ("sde", "SDE (the training sampler)"), ("sde_all_steps", "SDE, every step"))


def _mean_curve(values: dict[int, list[float]]) -> tuple[list[int], list[float]]:
    return sorted(values), [sum(values[e]) / len(values[e]) for e in sorted(values)]


def _sweep_curves(sweep: Path, out: Path, plt) -> list[tuple[str, str]]:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    eta_dirs = sorted(sweep.glob("eta=*"), key=lambda p: float(p.name.removeprefix("eta=")))
    epochs: set[int] = set()
    for i, eta_dir in enumerate(eta_dirs):
        curves, gaps = {}, {}
        for run in sorted(eta_dir.glob("seed=*")):
            if not (run / "metrics.jsonl").is_file():
                continue
            metrics = load_metrics(run)
            name, _ = eval_names(metrics)
            for epoch, value in zip(*_series(metrics, f"eval/{name}/ode/mean"), strict=True):
                curves.setdefault(epoch, []).append(value)
            for epoch, value in zip(*_series(metrics, f"eval/{name}/gap"), strict=True):
                gaps.setdefault(epoch, []).append(value)
        label = eta_dir.name.replace("=", " = ")
        epochs |= set(curves) | set(gaps)
        if curves:
            left.plot(*_mean_curve(curves), label=label, **_style(i))
        if gaps:
            right.plot(*_mean_curve(gaps), label=label, **_style(i))
    left.set(xlabel="epoch", ylabel="held-out ODE reward", title="ODE reward")
    right.axhline(0, color="0.7", lw=1)
    right.set(xlabel="epoch", ylabel="ODE − SDE", title="gap")
    for ax in (left, right):
        _integer_epochs(ax, [{"epoch": e} for e in epochs])
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
