"""DiffusionNFT on tiny random FLUX and SD models: only the LoRA trains, the sampling policy follows it, resume is
exact."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import run_helpers, small_config

from diffrl.config import FLUX_ATTENTION, ConfigError, apply_overrides
from diffrl.trainers import NFTTrainer, make_trainer


def nft_overrides(model: Path, *extra: str) -> list[str]:
    return [
        "--model.path", str(model), "--model.family", "flux", "--model.resolution", "32",
        "--model.max_sequence_length", "16", "--lora.target_modules", ",".join(FLUX_ATTENTION),
        "--train.algorithm", "nft", "--sample.eta", "0", "--train.timestep_fraction", "0.5",
        "--reward.spec", "rewards_helpers:brightness", *extra,
    ]  # fmt: skip


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def test_an_nft_epoch_trains_only_the_lora_and_moves_the_sampling_policy(random_flux_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_flux_dir), str(tmp_path / "run")),
        nft_overrides(random_flux_dir, "--train.epochs", "1", "--train.kl_coef", "0.1"),
    )
    trainer = make_trainer(config, reward=brightness)
    assert isinstance(trainer, NFTTrainer)
    before = {name: p.detach().clone() for name, p in trainer.policy.transformer.named_parameters()}
    frozen = [p.detach().clone() for p in trainer.policy.vae.parameters()]
    old_before = [o.clone() for o in trainer.old]
    trainer.train()
    after = dict(trainer.policy.transformer.named_parameters())
    changed = {name for name, p in after.items() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    assert all(torch.equal(a, b) for a, b in zip(frozen, trainer.policy.vae.parameters(), strict=True))
    # one optimizer step (8 samples, micro-batch 4, no accumulation: two), decay min(0.001 x step, 0.5)
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["train/optimizer_steps"] == 2 and row["train/kl"] >= 0 and 0 < row["train/optimality_mean"] < 1
    assert not all(torch.equal(a, b) for a, b in zip(old_before, trainer.old, strict=True))
    # the sampling policy is an EMA of the trained weights: after the last step it is 0.002 old + 0.998 new
    ema = [o for o in trainer.old]
    assert all(torch.allclose(o, p.detach(), atol=1e-2 * p.detach().abs().max().item() + 1e-6)
               for o, p in zip(ema, trainer.params, strict=True))  # fmt: skip
    saved = load_file(tmp_path / "run" / "checkpoints" / "epoch-000001" / "trainer_tensors.safetensors")
    assert len(saved) == len(trainer.old) and all(torch.equal(saved[f"sampling_policy.{i}"], o)
                                                  for i, o in enumerate(trainer.old))  # fmt: skip
    trainer.finish()


def test_an_nft_epoch_on_a_noise_predicting_model_trains_its_lora(random_sd_dir, tmp_path):
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), [
        "--train.algorithm", "nft", "--sample.eta", "0", "--train.timestep_fraction", "0.5", "--train.epochs", "1",
        "--reward.spec", "rewards_helpers:brightness",
    ])  # fmt: skip
    trainer = make_trainer(config, reward=brightness)
    before = {name: p.detach().clone() for name, p in trainer.policy.unet.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.policy.unet.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["train/optimizer_steps"] == 2 and math.isfinite(row["train/loss"])


def test_nft_takes_any_eta(random_flux_dir, tmp_path):
    config = apply_overrides(small_config(str(random_flux_dir), str(tmp_path)), nft_overrides(random_flux_dir))
    assert config.sample.eta == 0  # the ODE samples; no log-probability is needed
    with pytest.raises(ConfigError, match="train.nft_beta must be > 0"):
        apply_overrides(config, ["--train.nft_beta", "0"])


@pytest.mark.slow
def test_a_resumed_nft_run_is_identical_to_an_uninterrupted_one(random_flux_dir, tmp_path):
    extra = nft_overrides(random_flux_dir, "--train.epochs", "3", "--train.nft_decay_rate", "0.2")
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    run_helpers(
        [str(random_flux_dir), str(full), *extra],
        [str(random_flux_dir), str(interrupted), *extra, "--stop-after", "1"],
    )
    run_helpers([str(random_flux_dir), str(interrupted), *extra, "--resume", "latest"])
    for name in ("adapter/pytorch_lora_weights.safetensors", "trainer_tensors.safetensors"):
        a, b = (load_file(run / "checkpoints" / "epoch-000003" / name) for run in (full, interrupted))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
