"""TRL's DDPOTrainer on the embedded tiny SD with the `shapes` reward; run by scripts/bench_trl.py in TRL's own venv.

    <trl-venv>/bin/python scripts/trl_ddpo_runner.py --out trl.json --epochs 10 [--seed 0] [settings as JSON]

Writes per-epoch wall seconds and reward means. It needs trl 0.23.1 (the last release with DDPOTrainer) and diffrl
installed without dependencies into that venv (for the reward and the tiny model's path).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from accelerate import PartialState

from diffrl.rewards.shapes import shapes
from diffrl.tiny import tiny_model_path
from diffrl.tiny.world import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="DDPOConfig fields as JSON")
    args = parser.parse_args()
    PartialState()  # TRL 0.23's DDPOTrainer needs the accelerate state before its config is built
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    config = DDPOConfig(
        num_epochs=args.epochs,
        seed=args.seed,
        log_with=None,
        mixed_precision="no",
        save_freq=10**9,
        logdir=str(args.out.parent / "trl_logs"),
        **json.loads(args.settings),
    )
    prompts = load_prompts("train")
    rng = random.Random(args.seed)
    epoch_rewards: list[float] = []

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, batch_prompts, metadata):
        scores = shapes(images.float(), list(batch_prompts))
        epoch_rewards.extend(scores.tolist())
        return scores, {}

    pipeline = DefaultDDPOStableDiffusionPipeline(str(tiny_model_path("sd")), use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    epochs, global_step = [], 0
    for epoch in range(args.epochs):
        epoch_rewards.clear()
        started = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds = time.perf_counter() - started
        epochs.append({"epoch": epoch + 1, "seconds": seconds, "reward_mean": sum(epoch_rewards) / len(epoch_rewards)})
        print(f"trl epoch {epoch + 1}: {seconds:.1f} s, reward {epochs[-1]['reward_mean']:.4f}", flush=True)
    args.out.write_text(json.dumps({"epochs": epochs, "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
