"""GRPO learns: a short run on the shipped tiny SD raises its training prompt's reward far beyond the noise of the
measurement. The reward is the images' mean brightness, a smooth function of what the model draws that the first
(trained) step moves within a few epochs; the shapes verifier needs far longer runs (docs/learning.md). The gain is
measured with the ODE on the same noise before and after, so its standard error is that of the paired differences.
Pairing advantages with the wrong samples, flipping the loss's sign or never stepping the optimizer each leaves the
gain below the margin."""

import pytest
import torch

from diffrl import policies
from diffrl.config import Config, apply_overrides
from diffrl.evaluation import ODE, evaluate, paired_difference
from diffrl.rewards import weighted_sum
from diffrl.trainers import train

PROMPT = "a blue triangle and a red circle"


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def ode_brightness(config: Config, adapter=None) -> torch.Tensor:
    torch.manual_seed(0)
    policy = policies.load(config)
    if adapter is not None:
        policy.load_adapter(adapter)
    result = evaluate(policy, [PROMPT] * 64, weighted_sum(brightness), samplers=(ODE,), num_steps=10,
                      guidance_scale=2.0, seed=4321, batch_size=64)  # fmt: skip
    return result.scores["brightness"]["ode"]


@pytest.mark.slow
def test_grpo_raises_the_training_prompts_reward_by_five_standard_errors(tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n")
    config = apply_overrides(Config(), [
        "--model.path", "tiny", "--prompts.train", str(tmp_path / "prompt.txt"),
        "--sample.num_steps", "10", "--sample.guidance_scale", "2.0", "--sample.sde_window", "0,1",
        "--sample.batch_size", "32", "--sample.num_batches_per_epoch", "2",
        "--train.algorithm", "grpo", "--train.group_size", "16", "--train.batch_size", "16",
        "--train.num_inner_epochs", "2", "--train.lr", "2e-3", "--train.clip_range", "0.2", "--train.epochs", "3",
        "--eval.every_epochs", "0", "--logging.output_dir", str(tmp_path / "run"), "--logging.checkpoint_every", "0",
        "--logging.progress_bars", "false",
    ])  # fmt: skip
    before = ode_brightness(config)
    train(config, reward=brightness)
    after = ode_brightness(config, tmp_path / "run" / "checkpoints" / "epoch-000003")
    gain, stderr = paired_difference(after, before)
    assert gain > 5 * stderr, f"gain {gain:.5f} is not 5 standard errors ({stderr:.5f}) of the paired measurement"
