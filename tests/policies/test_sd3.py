"""The SD3 policy on a tiny random-weight SD3-architecture model saved in diffusers' layout (see conftest)."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffrl.config import FLUX_ATTENTION, Config, LoraConfig, ModelConfig, apply_overrides
from diffrl.policies.sd3 import SD3Policy
from diffrl.sampling.rollout import rollout
from diffrl.trainers import train

PROMPTS, SEEDS = ["a red circle", "two blue squares"], [3, 4]


def load(path, **model) -> SD3Policy:
    torch.manual_seed(0)
    config = ModelConfig(family="sd3", path=str(path), max_sequence_length=16, **model)
    return SD3Policy.load(config, LoraConfig(rank=4, alpha=8.0, target_modules=FLUX_ATTENTION))


def pipeline_images(path, steps: int, guidance: float, seeds=SEEDS, lora=None, **model) -> torch.Tensor:
    """Plain ``StableDiffusion3Pipeline`` samples, called with the arguments the policy's helper gives."""
    extra = {"text_encoder_3": None, "tokenizer_3": None} if model.get("t5") is False else {}
    pipeline = StableDiffusion3Pipeline.from_pretrained(path, **extra)
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(lora)
    kwargs = load(path, **model).pipeline_kwargs(steps, guidance)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipeline(PROMPTS, generator=generator, output_type="pt", **kwargs).images


@pytest.mark.parametrize("t5", [True, False], ids=["with T5", "without T5"])
def test_rollout_at_eta_zero_equals_the_sd3_pipeline(random_sd3_dir, t5):
    policy = load(random_sd3_dir, t5=t5)
    assert (policy.pipeline.text_encoder_3 is None) == (not t5)
    ours = rollout(policy, PROMPTS, SEEDS, eta=0.0, num_steps=6, guidance_scale=4.0)
    assert ours.images.shape == (2, 3, 32, 32)
    expected = pipeline_images(random_sd3_dir, steps=6, guidance=4.0, t5=t5)
    torch.testing.assert_close(ours.images, expected, atol=1e-5, rtol=1e-5)


def test_the_schedule_is_the_pipelines_shifted_one(random_sd3_dir):
    sigmas = load(random_sd3_dir).schedule(4).sigmas.double()

    def shift(s):
        return 3 * s / (1 + 2 * s)

    # diffusers spaces the steps evenly between the shifted ends of its 1,000 training sigmas, then shifts them
    plain = torch.linspace(1.0, shift(1 / 1000), 4, dtype=torch.float64)
    torch.testing.assert_close(sigmas[:-1], shift(plain), atol=1e-6, rtol=1e-6)
    assert sigmas[-1] == 0


@pytest.mark.parametrize("schedule", ["gddim", "flow_grpo"])
def test_sde_log_probabilities_rescore_exactly_on_the_sampling_layout(random_sd3_dir, schedule):
    policy = load(random_sd3_dir)
    trajectory = rollout(policy, PROMPTS, SEEDS, eta=1.0, num_steps=4, guidance_scale=2.0, noise_schedule=schedule)
    # gDDIM-flow's last step (to sigma 0) has no noise; Flow-GRPO's SDE (std sigma_t sqrt(-dt)) keeps some
    assert trajectory.sde_mask.tolist() == [True, True, True, schedule == "flow_grpo"]
    with torch.no_grad():
        for step in trajectory.sde_mask.nonzero().flatten().tolist():
            latents = trajectory.latents[:, step]
            out = policy.predict(latents, trajectory.timesteps[step], trajectory.prompt_embeds, 2.0)
            again = policy.step(
                out, 4, step, latents, eta=1.0, noise_schedule=schedule, prev_sample=trajectory.latents[:, step + 1]
            )
            assert torch.equal(again.log_prob, trajectory.log_probs[:, step])


def test_lora_round_trips_through_plain_sd3_pipeline(random_sd3_dir, tmp_path):
    policy = load(random_sd3_dir)
    for p in policy.trainable_parameters():  # a trained-looking adapter: non-zero LoRA B
        torch.nn.init.normal_(p, std=0.05)
    policy.save_adapter(tmp_path / "lora")
    mine = rollout(policy, PROMPTS, [1, 2], eta=0.0, num_steps=4, guidance_scale=2.0)
    base = pipeline_images(random_sd3_dir, steps=4, guidance=2.0, seeds=[1, 2])
    loaded = pipeline_images(random_sd3_dir, steps=4, guidance=2.0, seeds=[1, 2], lora=tmp_path / "lora")
    assert (base - mine.images).abs().max() > 1e-3  # the adapter changes the samples
    torch.testing.assert_close(loaded, mine.images, atol=1e-5, rtol=1e-5)
    fresh = load(random_sd3_dir)
    fresh.load_adapter(tmp_path / "lora")
    for a, b in zip(fresh.trainable_parameters(), policy.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_training_step_changes_only_lora_parameters(random_sd3_dir):
    policy = load(random_sd3_dir)
    before = {name: p.detach().clone() for name, p in policy.transformer.named_parameters()}
    encoders = [
        policy.vae,
        policy.pipeline.text_encoder,
        policy.pipeline.text_encoder_2,
        policy.pipeline.text_encoder_3,
    ]
    frozen = [p.detach().clone() for m in encoders for p in m.parameters()]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    trajectory = rollout(policy, PROMPTS, SEEDS, eta=1.0, num_steps=4, guidance_scale=2.0)
    rows, steps = torch.arange(2), torch.tensor([0, 2])
    out = policy.predict(trajectory.latents[rows, steps], trajectory.timesteps[steps], trajectory.prompt_embeds, 2.0)
    step = policy.step(
        out, 4, steps, trajectory.latents[rows, steps], eta=1.0, prev_sample=trajectory.latents[rows, steps + 1]
    )
    (-step.log_prob.mean()).backward()
    optimizer.step()
    changed = {name for name, p in policy.transformer.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    lora = {name for name, p in policy.transformer.named_parameters() if p.requires_grad}
    # SD3's last block drops its text stream (context_pre_only), so its text queries get no gradient: that LoRA B
    # stays at its zero initialisation (AdamW's weight decay moves every other weight, A included)
    assert lora - changed == {"transformer_blocks.0.attn.add_q_proj.lora_B.default.weight"}
    assert all(torch.equal(a, b) for a, b in zip(frozen, [p for m in encoders for p in m.parameters()], strict=True))


def test_grpo_trains_sd3_with_a_window_evaluation_and_a_checkpoint(random_sd3_dir, tmp_path):
    overrides = [
        "--model.family", "sd3", "--model.path", str(random_sd3_dir), "--model.max_sequence_length", "16",
        "--lora.target_modules", ",".join(FLUX_ATTENTION),
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
    pipeline = StableDiffusion3Pipeline.from_pretrained(random_sd3_dir)
    pipeline.load_lora_weights(tmp_path / "run" / "checkpoints" / "epoch-000002" / "adapter")
    with pytest.raises(Exception, match="is for SD; use gddim or flow_grpo"):
        apply_overrides(Config(), ["--model.family", "sd3", "--sample.noise_schedule", "ddim"]).validate()
