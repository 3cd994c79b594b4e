"""End-to-end runs of the trainers on a tiny random-weight SD (a few seconds each on a CPU)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import run_helpers, small_config

from diffrl.config import ConfigError, apply_overrides
from diffrl.trainers import GRPOTrainer, make_trainer, train
from diffrl.trainers.base import check_launch, derived_seed
from diffrl.trainers.common import EPS, group_advantages, subsample_timesteps

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "tiny_run.py"


def brightness(images, prompts, metadata):
    """A reward that varies on a random-weight model's images (the shapes verifier gives them all the same score)."""
    return images.mean(dim=(1, 2, 3))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lora_weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"epoch-{epoch:06d}" / "adapter" / "pytorch_lora_weights.safetensors")


# the training pass re-scores micro-batches of another layout than the sampling batch; a float32 network's output
# may differ there in the last bits on some CPUs (8e-7 seen with mean log-probabilities on an AMD EPYC)
FIRST_UPDATE_TOLERANCE = {"mean": 1e-5, "sum": 1e-3}


@pytest.mark.parametrize("algorithm", ["grpo", "ddpo_is", "ddpo_sf"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_first_update_is_on_policy_and_lora_changes(random_sd_dir, tmp_path, algorithm, reduction):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.algorithm", algorithm, "--train.check_on_policy", "true", "--train.epochs", "1",
         "--sample.log_prob_reduction", reduction],
    )  # fmt: skip
    trainer = make_trainer(config)
    before = [p.detach().clone() for p in trainer.params]
    trainer.train()
    metrics = read_metrics(tmp_path)[-1]
    # re-scoring every trained step with the sampling weights on the sampling batch's layout: ratio exactly 1
    assert metrics["train/on_policy_max_abs_ratio_minus_1"] == 0.0
    assert 0.0 <= metrics["train/ratio_first_update_max_abs_dev"] <= FIRST_UPDATE_TOLERANCE[reduction]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    assert 0.0 <= metrics["reward/mean"] <= 1.0 and metrics["reward/dropped"] == 0


def test_kl_to_the_reference_is_zero_before_and_positive_after_updates(random_sd_dir, tmp_path):
    # one optimizer step an epoch: every loss of epoch 1 is computed before the first update
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.kl_coef", "0.1", "--train.epochs", "2", "--train.gradient_accumulation_steps", "2"],
    )
    train(config, reward=brightness)
    first, second = read_metrics(tmp_path)
    assert first["train/kl"] == 0.0
    assert second["train/kl"] > 0.0


def test_a_run_starts_from_init_weights_and_keeps_the_base_model_as_reference(random_sd_dir, tmp_path):
    first = small_config(str(random_sd_dir), str(tmp_path / "first"))
    train(apply_overrides(first, ["--train.epochs", "1"]), reward=brightness)
    trained = lora_weights(tmp_path / "first", 1)
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path / "second")),
        ["--model.init_weights", str(tmp_path / "first" / "checkpoints" / "epoch-000001")],
    )
    trainer = make_trainer(config)
    trainer.policy.save_adapter(tmp_path / "start")
    started = load_file(tmp_path / "start" / "pytorch_lora_weights.safetensors")
    assert started.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(started[key], trained[key], rtol=0, atol=0)
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k or "lora.up" in k)
    with torch.no_grad():  # the reference is still the base model: disabling the LoRA changes the prediction
        latents = torch.randn(1, *trainer.policy.latent_shape)
        embeds = trainer.policy.encode_prompts(["a red circle"])
        with_lora = trainer.policy.predict(latents, 500, embeds, guidance_scale=1.0)
        with trainer.policy.reference():
            reference = trainer.policy.predict(latents, 500, embeds, guidance_scale=1.0)
    assert (with_lora - reference).abs().max() > 0

    missing = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path / "third")), ["--model.init_weights", str(tmp_path / "nope")]
    )
    with pytest.raises(ConfigError, match="model.init_weights: no pytorch_lora_weights.safetensors in .*nope"):
        make_trainer(missing)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_are_scaled_as_configured(random_sd_dir, tmp_path, scale):
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path)), ["--train.advantage_scale", scale])
    trainer = GRPOTrainer(config, reward=lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)))
    samples = trainer.sample_epoch(0, trainer.epoch_sampler(0))
    advantages = trainer.advantages(samples, trainer.gather_rewards(samples))
    groups = samples.rewards.view(-1, config.train.group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    divisor = {"group": groups.std(dim=1, unbiased=False).repeat_interleave(config.train.group_size) + EPS,
               "batch": samples.rewards.std(unbiased=False) + EPS, "none": torch.tensor(1.0)}[scale]  # fmt: skip
    assert torch.allclose(advantages, centred / divisor, rtol=1e-3, atol=1e-6)
    trainer.finish()


def test_reward_callable_from_python(random_sd_dir, tmp_path):
    seen = []

    def brightness(images, prompts, metadata):
        seen.append(len(prompts))
        return images.mean(dim=(1, 2, 3))

    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path)), ["--train.epochs", "1"])
    GRPOTrainer(config, reward=brightness).train()
    assert seen == [8]
    assert "reward/brightness/mean" in read_metrics(tmp_path)[-1]


def test_the_sde_window_moves_during_training(random_sd_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.epochs", "3", "--sample.sde_window", "0,2", "--sample.window_stride", "1",
         "--sample.window_shift_every", "2", "--logging.checkpoint_every", "0"],
    )  # fmt: skip
    train(config)
    windows = [(m["sample/sde_window_start"], m["sample/sde_window_end"]) for m in read_metrics(tmp_path)]
    assert windows == [(0, 2), (0, 2), (1, 3)]


def test_overlapped_scoring_matches_inline_scoring(random_sd_dir, tmp_path):
    threads = []

    def brightness(images, prompts, metadata):
        threads.append(threading.current_thread().name)
        return images.mean(dim=(1, 2, 3))

    runs = {}
    for overlap in ("true", "false", "auto"):
        config = apply_overrides(
            small_config(str(random_sd_dir), str(tmp_path / overlap)),
            ["--train.epochs", "1", "--sample.num_batches_per_epoch", "2", "--reward.overlap", overlap],
        )
        GRPOTrainer(config, reward=brightness).train()
        runs[overlap] = read_metrics(tmp_path / overlap)[-1]
    # 'auto' on a CPU scores an in-process reward inline (it would compete with the sampler for the cores)
    assert threads == ["reward_0", "reward_0"] + ["MainThread"] * 4
    for overlap in ("false", "auto"):
        assert runs["true"]["reward/mean"] == runs[overlap]["reward/mean"]
        assert runs["true"]["train/loss"] == runs[overlap]["train/loss"]


def test_auto_overlap_scores_a_reward_server_in_a_worker_thread_even_on_a_cpu(random_sd_dir, tmp_path):
    config = small_config(str(random_sd_dir), str(tmp_path / "run"))
    assert config.reward.overlap == "auto"
    trainer = GRPOTrainer(config, reward="http://127.0.0.1:9")  # not contacted: nothing is sampled
    assert trainer.overlap_scoring()
    trainer.finish()


def test_an_update_raises_the_log_probability_of_better_samples(random_sd_dir, tmp_path):
    """Sign and alignment of advantages with trajectories: after one epoch of updates on a batch, the
    advantage-weighted change of its log-probabilities is positive."""
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)), ["--train.epochs", "1", "--train.clip_range", "10"]
    )
    trainer = GRPOTrainer(config, reward=lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)))
    samples = trainer.sample_epoch(0, trainer.epoch_sampler(0))
    advantages = group_advantages(samples.rewards, config.train.group_size, samples.valid)
    trainer.train_epoch(0, samples, advantages)
    rows = torch.arange(len(advantages))
    with torch.no_grad():
        new = torch.stack(
            [trainer.step_loss(samples, rows, torch.full_like(rows, k), advantages)[2] for k in range(4)], dim=1
        )
    change = (new - samples.trajectory.log_probs).sum(dim=1)
    assert (advantages * change).sum() > 0
    trainer.finish()


def test_the_update_pairs_each_sample_with_its_own_advantage_and_steps(random_sd_dir, tmp_path):
    """AdamW's first step moves each weight by -lr g / (|g| + eps): its sign is the gradient's. That gradient must be
    the sum, sample by sample, of each sample's own advantage times its log-probability's gradient at the steps the
    trainer's generator drew for that sample (one random order per sample)."""
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.epochs", "1", "--train.gradient_accumulation_steps", "2", "--train.timestep_fraction", "0.5",
         "--train.weight_decay", "0", "--train.max_grad_norm", "1e9"],
    )  # fmt: skip
    trainer = GRPOTrainer(config, reward=lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)))
    samples = trainer.sample_epoch(0, trainer.epoch_sampler(0))
    advantages = torch.linspace(-1.0, 1.0, len(samples))[torch.randperm(len(samples))]  # distinct, no structure
    before = [p.detach().clone() for p in trainer.params]

    # the trainer's draw of rows and steps (train_epoch: derived_seed(seed, epoch, rank, 1))
    generator = torch.Generator().manual_seed(derived_seed(config.train.seed, 0, 0, 1))
    keep = samples.valid.nonzero().flatten()
    order = keep[torch.randperm(len(keep), generator=generator)]
    steps = subsample_timesteps(samples.trajectory.sde_mask, len(order), 0.5, generator)
    trainer.policy.denoiser.train()
    for row, row_steps in zip(order.tolist(), steps, strict=True):
        for step in row_steps.tolist():
            rows = torch.tensor([row])
            loss, _, _ = trainer.step_loss(samples, rows, torch.tensor([step]), advantages[rows])
            loss.loss.backward()
    expected = [p.grad.detach().clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)

    trainer.train_epoch(0, samples, advantages)
    agree = total = 0
    for old, new, grad in zip(before, trainer.params, expected, strict=True):
        big = grad.abs() > 1e-4 * max(g.abs().max().item() for g in expected)
        agree += int((torch.sign(old - new.detach())[big] == torch.sign(grad)[big]).sum())
        total += int(big.sum())
    assert total > 100
    assert agree / total > 0.98, f"update direction agrees with the per-sample gradient on {agree}/{total}"
    trainer.finish()


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_metrics_and_sample_grids_reach_the_tracker(random_sd_dir, tmp_path, monkeypatch, tracker):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path / "run")),
        ["--train.epochs", "1", "--eval.every_epochs", "1", "--eval.num_prompts", "2", "--logging.tracker", tracker],
    )
    # brightness moves the random model (so the two evaluations' grids differ: wandb stores equal images once)
    trainer = make_trainer(config, reward={"shapes": 1.0, brightness: 1.0})
    trainer.train()
    trainer.accelerator.end_training()
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "run"), size_guidance={"images": 0}).Reload()
        assert "reward/mean" in events.Tags()["scalars"]
        assert "eval/shapes/gap" in events.Tags()["scalars"]
        assert [e.step for e in events.Images("eval/samples")] == [0, 1]
    else:
        assert not list((tmp_path / "cwd").iterdir())  # W&B writes into the run folder, not ./wandb
        (run,) = (tmp_path / "run").glob("wandb/offline-run-*")
        assert run.name.endswith((tmp_path / "run" / "wandb_id").read_text().strip())  # a resume continues it
        records, images = _wandb_offline_run(run, [b"reward/mean", b"eval/shapes/gap"], images=2)
        assert b"reward/mean" in records and b"eval/shapes/gap" in records
        assert len(images) == 2
        tiles = list(run.glob("files/media/images/eval/images_*.png"))
        assert len(tiles) >= 2 * 2 * 2  # every image of both evaluations: 2 prompts x 2 samplers, with captions
        assert b" | ODE (eta 0) | total " in records and b" | training sampler: eta 1, every step" in records


def _wandb_offline_run(run: Path, needles: list[bytes], images: int, timeout: float = 60.0):
    """The offline log (protobuf records) and sample images of a wandb run. wandb's service process may still be
    writing them after ``run.finish()`` returns on a loaded machine, so wait (at most ``timeout`` s) for them."""
    deadline = time.monotonic() + timeout
    while True:
        records = b"".join(path.read_bytes() for path in run.glob("run-*.wandb"))
        found = list(run.glob("files/media/images/eval/samples_*.png"))
        if (all(n in records for n in needles) and len(found) >= images) or time.monotonic() > deadline:
            return records, found
        time.sleep(0.5)


def _run(args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    command = (launcher or [sys.executable]) + [str(HELPER), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


RESUME_SETTINGS = {
    "grpo, constant lr": [],
    # the scheduler's position must be restored: warm-up and cosine decay reach every epoch's learning rate
    "grpo, warm-up and cosine lr": ["--train.lr_schedule", "cosine", "--train.lr_warmup_steps", "3"],
    # two prompts, four samples each an epoch: from epoch 2 the per-prompt buffers (saved in the checkpoint) decide
    # the advantages instead of the batch statistics
    "ddpo_is, per-prompt statistics": ["--train.algorithm", "ddpo_is", "--train.stat_min_count", "6"],
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(RESUME_SETTINGS))
def test_resume_after_an_interrupted_run_is_identical(random_sd_dir, tmp_path, setting):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthree blue squares\n")
    extra = [*RESUME_SETTINGS[setting], "--prompts.train", str(prompts), "--reward.spec", "rewards_helpers:brightness"]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    run_helpers(
        [str(random_sd_dir), str(full), "--train.epochs", "3", *extra],
        [str(random_sd_dir), str(interrupted), "--train.epochs", "3", "--stop-after", "1", *extra],
    )
    run_helpers([str(random_sd_dir), str(interrupted), "--train.epochs", "3", "--resume", "latest", *extra])
    a, b = lora_weights(full, 3), lora_weights(interrupted, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def without_timing(rows):
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    assert without_timing(read_metrics(full)) == without_timing(read_metrics(interrupted))


@pytest.mark.slow
def test_two_processes_gather_the_same_batch_statistics_as_one(random_sd_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--train.epochs", "1", "--eval.every_epochs", "0"]
    _run([str(random_sd_dir), str(one), *common, "--sample.batch_size", "8"])
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
    ]  # fmt: skip
    _run(
        [str(random_sd_dir), str(two), *common, "--sample.batch_size", "4", "--train.batch_size", "4"],
        env_extra={"CUDA_VISIBLE_DEVICES": ""},
        launcher=launcher,
    )
    single, double = read_metrics(one)[-1], read_metrics(two)[-1]
    for key in ("reward/mean", "reward/std", "reward/zero_std_groups"):
        assert double[key] == pytest.approx(single[key], abs=1e-6), key


def test_the_logged_learning_rate_is_the_one_the_epoch_trained_with(random_sd_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.lr_schedule", "cosine", "--train.gradient_accumulation_steps", "2", "--train.lr", "1e-2"],
    )  # two epochs, one update each: the cosine factor is 1 for the first and 0.5 for the second
    train(config, reward=brightness)
    first, second = read_metrics(tmp_path)
    assert first["train/lr"] == pytest.approx(1e-2) and second["train/lr"] == pytest.approx(5e-3)
    assert first["train/advantage_abs_mean"] > 0 and first["train/optimizer_steps"] == 1


@pytest.mark.parametrize("cpu_flag", [[], ["--cpu"]], ids=["plain", "--cpu"])
def test_a_launch_that_asked_for_two_processes_and_started_one_stops(random_sd_dir, tmp_path, cpu_flag):
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", *cpu_flag, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [*launcher, str(HELPER), str(random_sd_dir), str(tmp_path / "run"), "--train.epochs", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "accelerate launch --multi_gpu --num_processes N" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training anything


def test_an_fsdp_launch_is_refused_before_training(random_sd_dir, tmp_path):
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "1", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [*launcher, str(HELPER), str(random_sd_dir), str(tmp_path / "run"), "--train.epochs", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "asks for FSDP, which diffrl does not support yet" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_launch_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed, which diffrl does not support yet"):
        check_launch()


def test_evaluation_compares_the_ode_with_the_sampler_that_trained(random_sd_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.epochs", "1", "--eval.every_epochs", "1", "--eval.num_prompts", "2", "--eval.num_steps", "8",
         "--sample.sde_window", "0,2", "--sample.eta", "1.5", "--eval.sde_etas", "1.5", "--eval.grid_prompts", "2"],
    )  # fmt: skip
    train(config, reward=brightness)
    rows = read_metrics(tmp_path)
    for row in rows:  # before and after training
        for label in ("ode", "train_sampler", "sde_eta=1.5"):
            assert f"eval/brightness/{label}/mean" in row
        gap = row["eval/brightness/ode/mean"] - row["eval/brightness/train_sampler/mean"]
        assert row["eval/brightness/gap"] == pytest.approx(gap, abs=1e-6)  # the gap is to the training sampler
        assert "eval/brightness/gap_sde_eta=1.5" in row
        # the window (steps 0-1 of 4, so 0-3 of 8) and every-step SDE at the same eta are different samplers
        assert row["eval/brightness/train_sampler/mean"] != row["eval/brightness/sde_eta=1.5/mean"]


def test_antithetic_groups_pair_opposite_step_noise_from_shared_initial_noise(random_sd_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path)),
        ["--train.antithetic_noise", "true", "--train.check_on_policy", "true", "--train.epochs", "1"],
    )
    trainer = GRPOTrainer(config, reward=brightness)
    prompts, seeds, step_seeds, mirror = trainer.epoch_sampler(0)(0)
    k = config.train.group_size
    assert mirror == [i % 2 == 1 for i in range(len(prompts))]
    assert seeds[0::2] == seeds[1::2] and step_seeds[0::2] == step_seeds[1::2]
    assert len(set(seeds[0::2])) == len(seeds) // 2  # every pair has its own noise
    # a step seed equal to an initial seed would draw the initial noise again as the step noise
    assert set(step_seeds).isdisjoint(seeds)
    assert all(prompts[i] == prompts[i - i % k] for i in range(len(prompts)))  # pairs never straddle groups
    samples = trainer.sample_epoch(0, trainer.epoch_sampler(0))
    latents = samples.trajectory.latents
    assert torch.equal(latents[0::2, 0], latents[1::2, 0])
    # the step noise is independent of the initial noise: the first step does not move along x_T
    first_move = (latents[0::2, 1] - latents[1::2, 1]).flatten(1)  # 2 std z per pair
    assert torch.nn.functional.cosine_similarity(first_move, latents[0::2, 0].flatten(1)).abs().max() < 0.5
    assert not torch.equal(latents[0::2, -1], latents[1::2, -1])
    trainer.finish()
    # training on mirrored samples re-scores them exactly (ratio 1 on the sampling layout)
    config = apply_overrides(config, ["--logging.output_dir", str(tmp_path / "trained")])
    GRPOTrainer(config, reward=brightness).train()
    assert read_metrics(tmp_path / "trained")[-1]["train/on_policy_max_abs_ratio_minus_1"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.antithetic_noise", "true", "--train.group_size", "3", "--sample.batch_size", "6"], "must be even"),
        (["--train.antithetic_noise", "true", "--train.algorithm", "ddpo_is"], "DDPO-IS has none"),
        (["--train.same_noise_in_group", "true", "--train.algorithm", "draft"], "DRaFT has none"),
    ],
)
def test_group_noise_options_are_checked(random_sd_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(small_config(str(random_sd_dir), str(tmp_path)), overrides)
