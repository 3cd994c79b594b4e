"""The FLUX policy on tiny random-weight FLUX.1-architecture models saved in diffusers' layout (see conftest)."""

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from diffrl.config import FLUX_ATTENTION, Config, LoraConfig, ModelConfig, apply_overrides
from diffrl.policies.flux import FluxPolicy
from diffrl.sampling.rollout import rollout
from diffrl.trainers import train

PROMPTS, SEEDS = ["a red circle", "two blue squares"], [3, 4]


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def load(path, **model) -> FluxPolicy:
    torch.manual_seed(0)
    config = ModelConfig(family="flux", path=str(path), resolution=32, max_sequence_length=16, **model)
    return FluxPolicy.load(config, LoraConfig(rank=4, alpha=8.0, target_modules=FLUX_ATTENTION))


def pipeline_images(path, steps: int, guidance: float, seeds=SEEDS, lora=None) -> torch.Tensor:
    """Plain ``FluxPipeline`` samples, called with the arguments the policy's helper gives."""
    pipeline = FluxPipeline.from_pretrained(path)
    if lora is not None:
        pipeline.load_lora_weights(lora)
    kwargs = load(path).pipeline_kwargs(steps, guidance)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipeline(PROMPTS, generator=generator, output_type="pt", **kwargs).images


def test_pipeline_kwargs_name_the_resolution_t5_length_and_guidance(random_flux_dir, random_flux_dev_dir):
    true_cfg, embedded = (
        load(random_flux_dir).pipeline_kwargs(6, 3.5),
        load(random_flux_dev_dir).pipeline_kwargs(6, 3.5),
    )
    common = {"num_inference_steps": 6, "height": 32, "width": 32, "max_sequence_length": 16}
    assert true_cfg == {**common, "true_cfg_scale": 3.5, "negative_prompt": ""}
    assert embedded == {**common, "guidance_scale": 3.5}


@pytest.mark.parametrize("model", ["true_cfg", "guidance_embedding"])
def test_rollout_at_eta_zero_equals_the_flux_pipeline(model, random_flux_dir, random_flux_dev_dir):
    path = random_flux_dir if model == "true_cfg" else random_flux_dev_dir
    policy = load(path)
    expected = pipeline_images(path, steps=6, guidance=3.5)
    ours = rollout(policy, PROMPTS, SEEDS, eta=0.0, num_steps=6, guidance_scale=3.5)
    torch.testing.assert_close(ours.images, expected, atol=1e-5, rtol=1e-5)
    assert not ours.sde_mask.any()


def test_the_schedule_is_the_pipelines_shifted_one(random_flux_dir):
    policy = load(random_flux_dir)
    schedule = policy.schedule(6)
    assert len(schedule) == 6 and schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0
    assert bool((schedule.sigmas[1:] < schedule.sigmas[:-1]).all())
    unshifted = torch.linspace(1.0, 1 / 6, 6)
    assert bool((schedule.sigmas[1:-1] > unshifted[1:]).all())  # the resolution shift keeps more steps at high noise


def test_sde_rollouts_have_finite_log_probs_except_the_last_step(random_flux_dir):
    policy = load(random_flux_dir)
    for schedule in ("gddim", "flow_grpo"):
        trajectory = rollout(policy, PROMPTS, SEEDS, eta=1.0, num_steps=5, guidance_scale=2.0, noise_schedule=schedule)
        # gDDIM-flow's last step lands on sigma = 0 with no noise; Flow-GRPO's Euler-Maruyama step still adds some
        assert trajectory.sde_mask.tolist() == [True, True, True, True, schedule == "flow_grpo"]
        assert torch.isfinite(trajectory.log_probs).all()
        assert trajectory.images.shape == (2, 3, 32, 32)
        # re-scoring the stored step with the sampling weights gives back its log-probability
        step = torch.tensor([2, 2])
        out = policy.predict(trajectory.latents[:, 2], trajectory.timesteps[step], trajectory.prompt_embeds, 2.0)
        rescored = policy.step(
            out, 5, step, trajectory.latents[:, 2], eta=1.0, noise_schedule=schedule,
            prev_sample=trajectory.latents[:, 3],
        )  # fmt: skip
        torch.testing.assert_close(rescored.log_prob, trajectory.log_probs[:, 2], atol=1e-4, rtol=1e-4)


def test_lora_round_trips_through_plain_flux_pipeline(random_flux_dir, tmp_path):
    policy = load(random_flux_dir)
    for p in policy.trainable_parameters():  # a trained-looking adapter: non-zero LoRA B
        torch.nn.init.normal_(p, std=0.05)
    policy.save_adapter(tmp_path / "lora")
    mine = rollout(policy, PROMPTS, [1, 2], eta=0.0, num_steps=4, guidance_scale=2.0)
    base = pipeline_images(random_flux_dir, steps=4, guidance=2.0, seeds=[1, 2])
    loaded = pipeline_images(random_flux_dir, steps=4, guidance=2.0, seeds=[1, 2], lora=tmp_path / "lora")
    assert (base - mine.images).abs().max() > 1e-3  # the adapter changes the samples
    torch.testing.assert_close(loaded, mine.images, atol=1e-5, rtol=1e-5)

    fresh = load(random_flux_dir)
    fresh.load_adapter(tmp_path / "lora")
    for a, b in zip(fresh.trainable_parameters(), policy.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_training_step_changes_only_lora_parameters(random_flux_dir):
    policy = load(random_flux_dir)
    before = {name: p.detach().clone() for name, p in policy.transformer.named_parameters()}
    frozen = [p.detach().clone() for m in (policy.vae, policy.pipeline.text_encoder) for p in m.parameters()]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    trajectory = rollout(policy, PROMPTS, SEEDS, eta=1.0, num_steps=4, guidance_scale=2.0)
    steps = torch.tensor([0, 2])
    rows = torch.arange(2)
    out = policy.predict(trajectory.latents[rows, steps], trajectory.timesteps[steps], trajectory.prompt_embeds, 2.0)
    step = policy.step(
        out, 4, steps, trajectory.latents[rows, steps], eta=1.0, prev_sample=trajectory.latents[rows, steps + 1]
    )
    (-step.log_prob.mean()).backward()
    optimizer.step()
    changed = {name for name, p in policy.transformer.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    assert len(changed) == len(policy.trainable_parameters())
    after = [p for m in (policy.vae, policy.pipeline.text_encoder) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))


def test_reference_disables_the_adapter(random_flux_dir):
    policy = load(random_flux_dir)
    for p in policy.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = policy.initial_latents([torch.Generator().manual_seed(0)])
    embeds = policy.encode_prompts(["a red circle"])
    with torch.no_grad():
        adapted = policy.predict(x, torch.tensor(500.0), embeds, 1.0)
        with policy.reference():
            base = policy.predict(x, torch.tensor(500.0), embeds, 1.0)
    assert (adapted - base).abs().max() > 1e-4


def test_grpo_trains_flux_with_a_window_through_the_same_trainer(random_flux_dir, tmp_path):
    overrides = [
        "--model.family", "flux", "--model.path", str(random_flux_dir), "--model.resolution", "32",
        "--model.max_sequence_length", "16", "--lora.target_modules", ",".join(FLUX_ATTENTION),
        "--sample.num_steps", "6", "--sample.sde_window", "1,3", "--sample.batch_size", "4",
        "--sample.num_batches_per_epoch", "1", "--sample.guidance_scale", "2.0",
        "--train.algorithm", "grpo", "--train.group_size", "2", "--train.batch_size", "4", "--train.epochs", "2",
        "--train.lr", "1e-2", "--train.check_on_policy", "true", "--eval.every_epochs", "1", "--eval.num_prompts", "2",
        "--eval.num_steps", "4", "--logging.output_dir", str(tmp_path / "run"), "--logging.progress_bars", "false",
    ]  # fmt: skip
    config = apply_overrides(Config(), overrides)
    train(config, reward=brightness)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if "train/loss" in row]
    assert len(trained) == 2
    assert all(row["train/on_policy_max_abs_ratio_minus_1"] < 1e-4 for row in trained)
    assert trained[0]["sample/sde_window_start"] == 1 and trained[0]["sample/sde_window_end"] == 3
    assert all({"eval/brightness/ode/mean", "eval/brightness/gap"} <= set(row) for row in rows)  # epochs 0, 1, 2
    adapter = tmp_path / "run" / "checkpoints" / "epoch-000002" / "adapter"
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.") and "lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
    pipeline = FluxPipeline.from_pretrained(random_flux_dir)
    pipeline.load_lora_weights(adapter)  # the trained FLUX adapter loads in plain diffusers


def test_noised_is_the_schedulers_forward_process_at_the_steps_sigma(random_flux_dir):
    policy = load(random_flux_dir)
    x0, noise = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    schedule = policy.schedule(6)
    for index in (0, 5):
        expected = policy.scheduler.scale_noise(x0, schedule.timesteps[index : index + 1].cpu(), noise)
        torch.testing.assert_close(policy.noised(x0, 6, index, noise), expected, rtol=1e-5, atol=1e-6)


def test_noised_takes_a_step_per_sample_and_the_exact_velocity_predicts_the_clean_sample(random_flux_dir):
    policy = load(random_flux_dir)
    x0, noise, index = torch.randn(2, 16, 8), torch.randn(2, 16, 8), torch.tensor([0, 4])
    x_t = policy.noised(x0, 6, index, noise)
    for row in (0, 1):
        one = policy.noised(x0[row : row + 1], 6, int(index[row]), noise[row : row + 1])
        torch.testing.assert_close(x_t[row], one[0])
    torch.testing.assert_close(policy.predicted_clean(noise - x0, 6, index, x_t), x0, rtol=1e-5, atol=1e-5)
