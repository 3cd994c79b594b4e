"""GRPO learns: a short run on the shipped tiny SD raises its training prompt's ``shapes`` reward far beyond the
noise of the measurement. On the embedded world a sample follows its prompt or draws another scene, a choice made at
the early steps the run trains (steps 1-2 of 10, without guidance; docs/learning.md), so the verifier's reward of
one prompt climbs within a few epochs. The gain is measured with the ODE on the same noise before and after, so its
standard error is that of the paired differences. Pairing advantages with the wrong samples, flipping the loss's sign
or never stepping the optimizer each leaves the gain below the margin."""

import pytest
import torch

from diffrl import policies
from diffrl.config import Config, apply_overrides
from diffrl.evaluation import ODE, evaluate, paired_difference
from diffrl.rewards import weighted_sum
from diffrl.trainers import train

PROMPT = "a blue triangle and a red circle"


def ode_reward(config: Config, adapter=None) -> torch.Tensor:
    torch.manual_seed(0)
    policy = policies.load(config)
    if adapter is not None:
        policy.load_adapter(adapter)
    result = evaluate(policy, [PROMPT] * 192, weighted_sum("shapes"), samplers=(ODE,), num_steps=10,
                      guidance_scale=1.0, seed=4321, batch_size=64)  # fmt: skip
    return result.scores["shapes"]["ode"]


@pytest.mark.slow
def test_grpo_raises_the_training_prompts_reward_by_five_standard_errors(tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n")
    config = apply_overrides(Config(), [
        "--model.path", "tiny", "--prompts.train", str(tmp_path / "prompt.txt"), "--reward.spec", "shapes",
        "--sample.num_steps", "10", "--sample.guidance_scale", "1.0", "--sample.sde_window", "1,3",
        "--sample.batch_size", "32", "--sample.num_batches_per_epoch", "2",
        "--train.algorithm", "grpo", "--train.group_size", "16", "--train.batch_size", "16",
        "--train.num_inner_epochs", "2", "--train.lr", "4e-3", "--train.clip_range", "0.2", "--train.epochs", "4",
        "--train.timestep_fraction", "1.0",
        "--eval.every_epochs", "0", "--logging.output_dir", str(tmp_path / "run"), "--logging.checkpoint_every", "0",
        "--logging.progress_bars", "false",
    ])  # fmt: skip
    before = ode_reward(config)
    train(config)
    after = ode_reward(config, tmp_path / "run" / "checkpoints" / "epoch-000004")
    gain, stderr = paired_difference(after, before)
    assert gain > 5 * stderr, f"gain {gain:.4f} is not 5 standard errors ({stderr:.4f}) of the paired measurement"
