"""The SDXL policy on tiny random-weight SDXL-architecture models saved in diffusers' layout (see conftest)."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from diffrl.config import Config, LoraConfig, ModelConfig, apply_overrides
from diffrl.policies.sdxl import SDXLPolicy
from diffrl.sampling.rollout import rollout
from diffrl.trainers import train

PROMPTS, SEEDS = ["a red circle", "two blue squares"], [3, 4]


def load(path, **model) -> SDXLPolicy:
    torch.manual_seed(0)
    return SDXLPolicy.load(ModelConfig(family="sdxl", path=str(path), **model), LoraConfig(rank=4, alpha=8.0))


def pipeline_images(path, steps: int, guidance: float, seeds=SEEDS, lora=None, eta: float = 0.0) -> torch.Tensor:
    """Plain ``StableDiffusionXLPipeline`` samples with the DDIM scheduler, called as the policy's helper says."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(path)
    policy = load(path)
    pipeline.scheduler = DDIMScheduler.from_config(policy.scheduler.config)  # as the README says
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(lora)
    kwargs = {**policy.pipeline_kwargs(steps, guidance), "eta": eta}
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipeline(PROMPTS, generator=generator, output_type="pt", **kwargs).images


@pytest.mark.parametrize("negative", ["zeros", "empty prompt"])
def test_rollout_at_eta_zero_equals_the_sdxl_pipeline(negative, random_sdxl_dir, random_sdxl_empty_prompt_dir):
    path = random_sdxl_dir if negative == "zeros" else random_sdxl_empty_prompt_dir
    policy = load(path)
    assert policy.force_zeros_for_empty_prompt == (negative == "zeros")
    ours = rollout(policy, PROMPTS, SEEDS, eta=0.0, num_steps=6, guidance_scale=4.0)
    assert ours.images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours.images, pipeline_images(path, steps=6, guidance=4.0), atol=1e-5, rtol=1e-5)


def test_the_ddpm_posterior_equals_the_pipeline_at_eta_one(random_sdxl_dir):
    policy = load(random_sdxl_dir)
    ours = rollout(policy, PROMPTS, SEEDS, eta=1.0, num_steps=5, guidance_scale=3.0)
    expected = pipeline_images(random_sdxl_dir, steps=5, guidance=3.0, eta=1.0)
    torch.testing.assert_close(ours.images, expected, atol=1e-4, rtol=1e-4)
    # this Euler config names no set_alpha_to_one, so DDIM's final alpha is 1: the last step has no noise
    assert ours.sde_mask[:-1].all() and not ours.sde_mask[-1] and torch.isfinite(ours.log_probs).all()


def test_sde_log_probabilities_rescore_exactly_on_the_sampling_layout(random_sdxl_dir):
    policy = load(random_sdxl_dir)
    trajectory = rollout(policy, PROMPTS, SEEDS, eta=1.3, num_steps=4, guidance_scale=2.0)
    assert trajectory.sde_mask.tolist() == [True, True, True, False]  # the last step has no noise (see above)
    with torch.no_grad():
        for step in range(3):
            latents = trajectory.latents[:, step]
            out = policy.predict(latents, trajectory.timesteps[step], trajectory.prompt_embeds, 2.0)
            again = policy.step(out, 4, step, latents, eta=1.3, prev_sample=trajectory.latents[:, step + 1])
            assert torch.equal(again.log_prob, trajectory.log_probs[:, step])


def test_lora_round_trips_through_plain_sdxl_pipeline(random_sdxl_dir, tmp_path):
    policy = load(random_sdxl_dir)
    for p in policy.trainable_parameters():  # a trained-looking adapter: non-zero LoRA B
        torch.nn.init.normal_(p, std=0.05)
    policy.save_adapter(tmp_path / "lora")
    mine = rollout(policy, PROMPTS, [1, 2], eta=0.0, num_steps=4, guidance_scale=2.0)
    base = pipeline_images(random_sdxl_dir, steps=4, guidance=2.0, seeds=[1, 2])
    loaded = pipeline_images(random_sdxl_dir, steps=4, guidance=2.0, seeds=[1, 2], lora=tmp_path / "lora")
    assert (base - mine.images).abs().max() > 1e-3  # the adapter changes the samples
    torch.testing.assert_close(loaded, mine.images, atol=1e-5, rtol=1e-5)
    fresh = load(random_sdxl_dir)
    fresh.load_adapter(tmp_path / "lora")
    for a, b in zip(fresh.trainable_parameters(), policy.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_training_step_changes_only_lora_parameters(random_sdxl_dir):
    policy = load(random_sdxl_dir)
    before = {name: p.detach().clone() for name, p in policy.unet.named_parameters()}
    frozen = [
        p.detach().clone() for m in (policy.vae, policy.text_encoder, policy.text_encoder_2) for p in m.parameters()
    ]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    trajectory = rollout(policy, PROMPTS, SEEDS, eta=1.0, num_steps=4, guidance_scale=2.0)
    rows, steps = torch.arange(2), torch.tensor([0, 2])
    out = policy.predict(trajectory.latents[rows, steps], trajectory.timesteps[steps], trajectory.prompt_embeds, 2.0)
    step = policy.step(
        out, 4, steps, trajectory.latents[rows, steps], eta=1.0, prev_sample=trajectory.latents[rows, steps + 1]
    )
    (-step.log_prob.mean()).backward()
    optimizer.step()
    changed = {name for name, p in policy.unet.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    assert len(changed) == len(policy.trainable_parameters())
    after = [p for m in (policy.vae, policy.text_encoder, policy.text_encoder_2) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))


def test_a_float16_model_keeps_a_vae_that_asks_to_upcast_in_float32(random_sdxl_dir):
    policy = load(random_sdxl_dir, dtype="float16")
    assert policy.vae.dtype == torch.float32 and policy.unet.dtype == torch.float16
    fixed = load(random_sdxl_dir, dtype="float16", vae=str(random_sdxl_dir / "vae"))  # a VAE named by the user
    assert fixed.vae.dtype == torch.float32  # its config asks to upcast too
    with pytest.raises(FileNotFoundError, match="model.vae .* is not a VAE folder"):
        load(random_sdxl_dir, vae=str(random_sdxl_dir / "nowhere"))


def test_grpo_trains_sdxl_with_a_window_evaluation_and_a_checkpoint(random_sdxl_dir, tmp_path):
    overrides = [
        "--model.family", "sdxl", "--model.path", str(random_sdxl_dir),
        "--sample.num_steps", "4", "--sample.batch_size", "4", "--sample.num_batches_per_epoch", "1",
        "--sample.guidance_scale", "2.0", "--sample.sde_window", "0,2",
        "--train.batch_size", "2", "--train.group_size", "2", "--train.epochs", "2", "--train.lr", "1e-2",
        "--eval.every_epochs", "1", "--eval.num_prompts", "2", "--eval.num_steps", "4", "--eval.grid_prompts", "2",
        "--reward.spec", "jpeg_compressibility",
        "--logging.output_dir", str(tmp_path / "run"), "--logging.checkpoint_every", "1",
        "--logging.progress_bars", "false",
    ]  # fmt: skip
    train(apply_overrides(Config(), overrides))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all({"eval/jpeg_compressibility/ode/mean", "eval/jpeg_compressibility/gap"} <= set(r) for r in rows)
    assert rows[-1]["sample/sde_window_end"] == 2
    adapter = tmp_path / "run" / "checkpoints" / "epoch-000002" / "adapter"
    pipeline = StableDiffusionXLPipeline.from_pretrained(random_sdxl_dir)
    pipeline.load_lora_weights(adapter)  # the trained SDXL adapter loads in plain diffusers
    assert (tmp_path / "run" / "samples" / "epoch-000002.png").is_file()


def test_the_embedded_model_is_not_an_sdxl(tmp_path):
    with pytest.raises(ValueError, match="no embedded tiny model for family 'sdxl'"):
        load("tiny")
