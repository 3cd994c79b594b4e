"""Eta sweeps: one training run per (training eta, seed), each evaluated ODE vs SDE from the same noise.

    diffrl sweep recipes/grpo_tiny.py --eta 0.5,1.0,1.2,2.0 --seeds 3 [--eval-steps 10,20] [--section.key value ...]

Layout of ``--out`` (default ``runs/sweep-<recipe>``)::

    sweep.json                    the sweep's settings (a re-run must use the same recipe and overrides)
    eta=<x>/seed=<s>/             a normal run folder (config, metrics.jsonl, checkpoints) ...
    eta=<x>/seed=<s>/result.json  ... and its final evaluation, written last: a run with it is done
    sweep.csv, sweep.md           per training eta and step count: ODE, SDE and gap, mean ± standard error over seeds

A killed sweep continues where it stopped: finished runs are skipped, an interrupted run resumes from its latest
checkpoint. Every evaluation uses the held-out prompts with the same per-prompt seeds (``eval.seed``), so ODE and
SDE start from the same noise, and every run is scored on the same noise.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch

from diffrl.config import Config, ConfigError, apply_overrides

RESULT = "result.json"


def run_dir(out: Path, eta: float, seed: int) -> Path:
    return out / f"eta={eta:g}" / f"seed={seed}"


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _check_settings(out: Path, settings: dict) -> None:
    """A sweep folder belongs to one recipe and one set of overrides; more etas or seeds may be added later."""
    path = out / "sweep.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        for key in ("recipe", "overrides", "eval_steps"):
            if saved.get(key) != settings[key]:
                raise ConfigError(
                    f"{out} holds a sweep with {key} = {saved.get(key)!r}, not {settings[key]!r}; use another --out "
                    "or the same settings."
                )
        settings = {**settings, "etas": sorted(set(saved["etas"]) | set(settings["etas"])),
                    "seeds": sorted(set(saved["seeds"]) | set(settings["seeds"]))}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


@torch.no_grad()
def evaluate_run(config: Config, directory: Path, eval_steps: list[int]) -> dict:
    """The ODE against the run's training sampler (its eta and final SDE window; ``sde``) on the held-out prompts
    with the run's final LoRA, per step count, and, when the run trained a window, every-step SDE at its eta
    (``sde_all_steps``); plus the base-policy gap from the run's first evaluation when it logged one."""
    from diffrl import policies
    from diffrl.checkpoint import find_checkpoint
    from diffrl.evaluation import TRAIN_LABEL, Sampler, evaluate_with_config, primary_reward
    from diffrl.loading import load_eval_prompts
    from diffrl.rewards import weighted_sum

    checkpoint = find_checkpoint(directory, "latest")
    policy = policies.load(config)
    policy.load_adapter(checkpoint / "adapter")
    prompts = load_eval_prompts(config)
    reward = weighted_sum(config.reward.spec, kwargs=config.reward.kwargs)
    name, eta = primary_reward(reward.names), config.sample.eta
    windowed = config.sample.sde_window is not None
    result = {"eta": eta, "seed": config.train.seed, "reward": name, "checkpoint": checkpoint.name, "steps": {}}
    for num_steps in eval_steps:
        evaluation = evaluate_with_config(
            policy, config, prompts, reward, completed_epochs=config.train.epochs, sde_etas=[eta] if windowed else [],
            num_steps=num_steps,
        )  # fmt: skip
        gap, gap_stderr = evaluation.gap(name)
        cell = {
            "ode": evaluation.mean(name, "ode"),
            "sde": evaluation.mean(name, TRAIN_LABEL),
            "gap": gap,
            "gap_stderr": gap_stderr,
            "sde_sampler": evaluation.samplers[1].describe(num_steps),
        }
        if windowed:
            cell["sde_all_steps"] = evaluation.mean(name, Sampler.every_step(eta).label)
        result["steps"][str(num_steps)] = cell
    first = _first_evaluation(directory / "metrics.jsonl", name)
    if first is not None:
        result["base_gap"] = {"steps": config.eval.num_steps, "gap": first}
    return result


def _first_evaluation(metrics_path: Path, name: str) -> float | None:
    if not metrics_path.is_file():
        return None
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("epoch") == 0 and f"eval/{name}/gap" in record:
            return record[f"eval/{name}/gap"]
    return None


def run_sweep(
    recipe: str, etas: list[float], seeds: list[int], out: Path, overrides: list[str], eval_steps: list[int] | None
) -> list[dict]:
    """Train and evaluate every (eta, seed) not done yet; write and return the summary rows."""
    from diffrl.loading import load_recipe
    from diffrl.trainers import train

    base = apply_overrides(load_recipe(recipe)(), overrides)
    steps = eval_steps or [base.eval.num_steps]
    settings = {"recipe": str(recipe), "overrides": list(overrides), "eval_steps": steps, "etas": etas,
                "seeds": seeds}  # fmt: skip
    _check_settings(out, settings)
    for eta in etas:
        for seed in seeds:
            directory = run_dir(out, eta, seed)
            if (directory / RESULT).is_file():
                print(f"sweep: eta={eta:g} seed={seed} is done; skipped", flush=True)
                continue
            config = apply_overrides(
                base, ["--sample.eta", str(eta), "--train.seed", str(seed), "--logging.output_dir", str(directory)]
            )
            # a run killed before its first checkpoint has only its config: --resume latest starts it again
            resume = "latest" if (directory / "config.json").exists() else None
            print(f"sweep: training eta={eta:g} seed={seed}" + (" (resuming)" if resume else ""), flush=True)
            train(config, resume=resume)
            _write_json(directory / RESULT, evaluate_run(config, directory, steps))
    return summarize(out)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def summarize(out: Path) -> list[dict]:
    """Aggregate every finished run of the sweep in ``out`` over seeds; writes ``sweep.csv`` and ``sweep.md``."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob(f"eta=*/seed=*/{RESULT}"))]
    if not results:
        raise FileNotFoundError(f"no finished runs (eta=*/seed=*/{RESULT}) under {out}.")
    rows = []
    for eta in sorted({r["eta"] for r in results}):
        runs = [r for r in results if r["eta"] == eta]
        for steps in sorted({int(s) for r in runs for s in r["steps"]}):
            cells = [r["steps"][str(steps)] for r in runs if str(steps) in r["steps"]]
            row = {"eta": eta, "steps": steps, "seeds": len(cells), "reward": runs[0]["reward"]}
            for key in ("ode", "sde", "gap", "sde_all_steps"):
                if all(key in c for c in cells):
                    row[f"{key}_mean"], row[f"{key}_stderr"] = _mean_stderr([c[key] for c in cells])
            base_gaps = [r["base_gap"]["gap"] for r in runs if r.get("base_gap", {}).get("steps") == steps]
            if base_gaps:
                row["base_gap_mean"], row["base_gap_stderr"] = _mean_stderr(base_gaps)
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.md").write_text(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    def cell(row: dict, key: str) -> str:
        if f"{key}_mean" not in row:
            return ""
        mean, stderr = row[f"{key}_mean"], row[f"{key}_stderr"]
        return f"{mean:.3f}" if math.isnan(stderr) else f"{mean:.3f} ± {stderr:.3f}"

    reward = rows[0]["reward"]
    lines = [
        f"Held-out `{reward}` reward after training, mean ± standard error over seeds. ODE: eta = 0; SDE: the "
        "sampler that trained (the training eta on its SDE window); gap = ODE − SDE on the same noise (base gap: "
        "the same before training, at the training evaluation's step count); every-step SDE: every step "
        "stochastic at the training eta (runs that trained a window).",
        "",
        "| training eta | steps | seeds | ODE | SDE | gap | base gap | every-step SDE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['eta']:g} | {row['steps']} | {row['seeds']} | {cell(row, 'ode')} | {cell(row, 'sde')} | "
            f"{cell(row, 'gap')} | {cell(row, 'base_gap')} | {cell(row, 'sde_all_steps')} |"
        )
    return "\n".join(lines) + "\n"
