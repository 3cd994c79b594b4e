"""diffrl against TRL's DDPOTrainer on the embedded tiny SD with the `shapes` reward, same settings.

    python scripts/bench_trl.py [--epochs 10] [--seed 0] [--trl-venv runs/trl-venv] [--out runs/bench_trl] [--compile]

TRL 0.23.1 is the last release with DDPOTrainer. The script installs it into its own venv (``--trl-venv``; the CPU
torch pinned by constraints-cpu.txt, diffrl itself without dependencies) unless that venv already has it, then
runs, for the same number of epochs and the same samples per epoch:

- TRL's DDPOTrainer (its LoRA: rank 4 on to_q/to_k/to_v/to_out.0; importance sampling with clipping, per-prompt
  reward normalisation, all steps stochastic, a fraction of them trained);
- diffrl's DDPO-IS with those settings;
- diffrl's GRPO with the same samples per epoch (groups of 4 images per prompt);
- with ``--compile``, diffrl's DDPO-IS again with ``model.compile`` (its first epoch includes the compilation).

It prints wall seconds per epoch (median; the first epoch and the total beside it), the ratio diffrl / TRL, the
training reward over the last epochs, and how many samples diffrl's GRPO needed to reach the reward TRL's DDPO ends
with (the mean over its last 3 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from diffrl.config import Config, apply_overrides
from diffrl.trainers import train

REPO = Path(__file__).resolve().parents[1]
# The shared settings: 20 steps, CFG 2, eta 1, 32 samples an epoch (2 batches of 16), one optimizer step an epoch
# (train batch 8 x 4 accumulated), 10 of the 20 steps trained per sample, LoRA rank 4, lr 3e-4.
TRL_SETTINGS = {
    "sample_num_steps": 20,
    "sample_guidance_scale": 2.0,
    "sample_eta": 1.0,
    "sample_batch_size": 16,
    "sample_num_batches_per_epoch": 2,
    "train_batch_size": 8,
    "train_gradient_accumulation_steps": 4,
    "train_learning_rate": 3e-4,
    "train_clip_range": 1e-4,
    "train_adv_clip_max": 5.0,
    "train_timestep_fraction": 0.5,
    "train_num_inner_epochs": 1,
    "per_prompt_stat_tracking": True,
    "per_prompt_stat_tracking_buffer_size": 16,
    "per_prompt_stat_tracking_min_count": 16,
}
DIFFRL_SETTINGS = [
    "--model.path", "tiny", "--lora.rank", "4", "--lora.alpha", "4",
    "--sample.num_steps", "20", "--sample.guidance_scale", "2.0", "--sample.eta", "1.0",
    "--sample.batch_size", "16", "--sample.num_batches_per_epoch", "2",
    "--train.batch_size", "8", "--train.gradient_accumulation_steps", "4", "--train.lr", "3e-4",
    "--train.clip_range", "1e-4", "--train.adv_clip_max", "5.0", "--train.timestep_fraction", "0.5",
    "--train.num_inner_epochs", "1", "--train.stat_buffer_size", "16", "--train.stat_min_count", "16",
    "--reward.spec", "shapes", "--prompts.train", "tiny:train", "--eval.every_epochs", "0",
    "--logging.checkpoint_every", "0", "--logging.progress_bars", "false",
]  # fmt: skip
SAMPLES_PER_EPOCH = 32


def trl_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl.trainer.ddpo_trainer"]).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(REPO / "constraints-cpu.txt")]
    subprocess.run(
        [*pip, "trl==0.23.1", "diffusers==0.42.1", "peft", "accelerate", "transformers", "scipy"], check=True
    )
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)
    return python


def diffrl_run(out: Path, algorithm: str, epochs: int, seed: int, extra: tuple[str, ...] = ()) -> list[dict]:
    overrides = [*DIFFRL_SETTINGS, *extra, "--train.algorithm", algorithm, "--train.epochs", str(epochs)]
    overrides += ["--train.seed", str(seed), "--logging.output_dir", str(out)]
    if algorithm == "grpo":
        overrides += ["--train.group_size", "4"]
    config = apply_overrides(Config(), overrides)
    if out.exists() and (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if len(rows) == epochs:
            return rows
        raise SystemExit(f"{out} holds an unfinished run; remove it and run the benchmark again.")
    train(config)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-venv", type=Path, default=REPO / "runs" / "trl-venv")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_trl")
    parser.add_argument(
        "--compile", action="store_true", help="also run DDPO-IS with model.compile (its first epoch compiles)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    python = trl_python(args.trl_venv)
    trl_json = args.out / f"trl-seed{args.seed}.json"
    if not trl_json.exists():
        command = [str(python), str(REPO / "scripts" / "trl_ddpo_runner.py"), "--out", str(trl_json)]
        command += ["--epochs", str(args.epochs), "--seed", str(args.seed), "--settings", json.dumps(TRL_SETTINGS)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, check=True, env=env)
    trl = json.loads(trl_json.read_text())["epochs"]
    ddpo = diffrl_run(args.out / f"diffrl-ddpo_is-seed{args.seed}", "ddpo_is", args.epochs, args.seed)
    grpo = diffrl_run(args.out / f"diffrl-grpo-seed{args.seed}", "grpo", args.epochs, args.seed)
    runs = [("diffrl DDPO-IS", ddpo), ("diffrl GRPO", grpo)]
    if args.compile:
        compiled = ("--model.compile", "true")
        out = args.out / f"diffrl-ddpo_is-compiled-seed{args.seed}"
        runs.append(("diffrl DDPO-IS, compiled", diffrl_run(out, "ddpo_is", args.epochs, args.seed, compiled)))

    def diffrl_seconds(rows):
        return [row["time/sampling_s"] + row["time/training_s"] for row in rows]

    def last(values, n=3):
        return sum(values[-n:]) / n

    trl_s = statistics.median(e["seconds"] for e in trl)
    trl_final = last([e["reward_mean"] for e in trl])
    grpo_rewards = [row["reward/mean"] for row in grpo]
    # first epoch whose 3-epoch running mean reaches TRL's final reward
    reached = next(
        (i + 1 for i in range(2, len(grpo_rewards)) if sum(grpo_rewards[i - 2 : i + 1]) / 3 >= trl_final), None
    )
    print(f"\n{args.epochs} epochs of {SAMPLES_PER_EPOCH} samples, seed {args.seed}, this CPU:")
    print(
        "| trainer | s/epoch (median) | vs TRL | first epoch s | total s | train reward, epoch 1 | "
        "train reward, last 3 epochs |"
    )
    print("|---|---|---|---|---|---|---|")
    trl_times = [e["seconds"] for e in trl]
    print(
        f"| TRL DDPOTrainer 0.23.1 | {trl_s:.2f} | 1.00 | {trl_times[0]:.2f} | {sum(trl_times):.1f} | "
        f"{trl[0]['reward_mean']:.3f} | {trl_final:.3f} |"
    )
    summary = {"trl_s": trl_s, "trl_final": trl_final, "grpo_reached": reached}
    for name, rows in runs:
        rewards, seconds = [row["reward/mean"] for row in rows], diffrl_seconds(rows)
        median = statistics.median(seconds)
        summary[name] = {"median_s": median, "total_s": sum(seconds), "final_reward": last(rewards)}
        print(
            f"| {name} | {median:.2f} | {median / trl_s:.2f} | {seconds[0]:.2f} | {sum(seconds):.1f} | "
            f"{rewards[0]:.3f} | {last(rewards):.3f} |"
        )
    trl_samples = args.epochs * SAMPLES_PER_EPOCH
    if reached is None:
        print(f"diffrl GRPO did not reach TRL's final reward {trl_final:.3f} within {trl_samples} samples.")
    else:
        samples = reached * SAMPLES_PER_EPOCH
        print(
            f"diffrl GRPO reached TRL's final reward {trl_final:.3f} after {samples} samples "
            f"({samples / trl_samples:.2f} of TRL's {trl_samples})."
        )
    (args.out / f"summary-seed{args.seed}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
