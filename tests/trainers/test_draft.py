"""DRaFT-K on a tiny random SD: a differentiable reward's gradient reaches the LoRA through the last K steps only."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import run_helpers, small_config

from diffrl.config import ConfigError, apply_overrides
from diffrl.trainers import DRaFTTrainer, make_trainer

DRAFT = ["--train.algorithm", "draft", "--sample.eta", "0", "--train.draft_k", "2", "--train.lr", "1e-2"]


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def test_a_reward_without_gradients_is_refused_at_start_up(random_sd_dir, tmp_path):
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path)), [*DRAFT, "--reward.spec", "shapes"])
    with pytest.raises(ConfigError, match="reward 'shapes' is not differentiable"):
        make_trainer(config)


def test_gradients_reach_the_lora_through_the_last_k_steps_and_no_further(random_sd_dir, tmp_path):
    overrides = [*DRAFT, "--train.epochs", "1", "--train.kl_coef", "1"]
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), overrides)
    trainer = make_trainer(config, reward=brightness)
    assert isinstance(trainer, DRaFTTrainer)
    predict, calls = trainer.policy.predict, []

    def recording(latents, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return predict(latents, *args, **kwargs)

    trainer.policy.predict = recording
    images, trained = trainer.images_with_gradients(["a red circle"] * 2, [0, 1], k=2)
    assert calls == [False, False, True, True] and [i for *_, i in trained] == [2, 3]  # 4 steps, the last 2 trained
    calls.clear()
    images.mean().backward()  # the backward pass recomputes the 2 checkpointed steps, and nothing before them
    assert calls == [True, True]
    grads = [p.grad for p in trainer.params]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.policy.predict = predict

    before = {name: p.detach().clone() for name, p in trainer.policy.unet.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.policy.unet.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["train/optimizer_steps"] == 1 and last["train/kl"] >= 0 and "reward/brightness/mean" in last
    trainer.finish()


def test_draft_lv_averages_the_last_step_over_noised_copies_of_the_finished_sample(random_sd_dir, tmp_path):
    overrides = [*DRAFT, "--train.draft_k", "1", "--train.draft_lv_samples", "3", "--train.epochs", "1"]
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), overrides)
    trainer = make_trainer(config, reward=brightness)
    predict, calls = trainer.policy.predict, []

    def recording(latents, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), len(latents)))
        return predict(latents, *args, **kwargs)

    trainer.policy.predict = recording
    images, trained = trainer.images_with_gradients(["a red circle", "a blue square"], [0, 1], k=1)
    # the whole chain without gradients, then the last step again from each of the 3 noised copies
    assert [grad for grad, _ in calls] == [False] * 4 + [True] * 3 and [i for *_, i in trained] == [3, 3, 3]
    assert images.shape[0] == 6 and images.requires_grad
    starts = [latents for _, latents, _, _ in trained]
    assert not torch.equal(starts[0], starts[1])  # each copy has its own noise
    calls.clear()
    images.mean().backward()
    assert [grad for grad, _ in calls] == [True] * 3  # recomputed: the one step per copy, nothing earlier
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.policy.predict = predict
    again, _ = trainer.images_with_gradients(["a red circle", "a blue square"], [0, 1], k=1)
    assert torch.equal(images.detach(), again.detach())  # the copies' noise derives from the samples' seeds
    trainer.train()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train/optimizer_steps"] == 1 and "reward/brightness/mean" in last
    trainer.finish()


@pytest.mark.parametrize("extra", [["--train.draft_k", "2"], ["--train.draft_random_k", "true"]])
def test_draft_lv_needs_the_last_step_alone(random_sd_dir, tmp_path, extra):
    config = small_config(str(random_sd_dir), str(tmp_path))
    with pytest.raises(ConfigError, match="draft_lv_samples"):
        apply_overrides(config, [*DRAFT, *extra, "--train.draft_lv_samples", "2"])


@pytest.mark.slow
def test_a_resumed_draft_run_is_identical_to_an_uninterrupted_one(random_sd_dir, tmp_path):
    extra = [*DRAFT, "--train.epochs", "3", "--train.draft_random_k", "true", "--sample.eta", "1.0",
             "--reward.spec", "rewards_helpers:brightness"]  # fmt: skip
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    run_helpers(
        [str(random_sd_dir), str(full), *extra], [str(random_sd_dir), str(interrupted), *extra, "--stop-after", "1"]
    )
    run_helpers([str(random_sd_dir), str(interrupted), *extra, "--resume", "latest"])
    name = "adapter/pytorch_lora_weights.safetensors"
    a, b = (load_file(run / "checkpoints" / "epoch-000003" / name) for run in (full, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_draft_trains_on_the_learned_proxy_and_watches_the_verifier(random_sd_dir, tmp_path):
    overrides = [*DRAFT, "--train.epochs", "1", "--reward.spec", "shapes_learned,shapes=0"]
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), overrides)
    trainer = make_trainer(config)
    trainer.train()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train/optimizer_steps"] == 1 and last["train/grad_norm"] > 0
    assert 0 <= last["reward/shapes/mean"] <= 1  # watched: logged, not trained on
    assert last["reward/mean"] == pytest.approx(last["reward/shapes_learned/mean"])
    trainer.finish()
