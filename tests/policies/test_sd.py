import warnings

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffrl.config import UNET_BLOCKS, LoraConfig, ModelConfig
from diffrl.policies.common import resolve_model_path
from diffrl.policies.sd import SDPolicy
from diffrl.sampling.rollout import rollout


@pytest.fixture
def policy(random_sd_dir):
    torch.manual_seed(0)
    return SDPolicy.load(ModelConfig(path=str(random_sd_dir)), LoraConfig(rank=4, alpha=8.0))


def test_rollout_at_eta_zero_equals_the_diffusers_pipeline(random_sd_dir, policy):
    pipeline = StableDiffusionPipeline.from_pretrained(random_sd_dir)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    kwargs = policy.pipeline_kwargs(10, 4.0)  # what the README tells a user to pass
    assert kwargs == {"num_inference_steps": 10, "guidance_scale": 4.0, "eta": 0.0, "height": 64, "width": 64}
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    expected = pipeline(prompts, generator=generator, output_type="pt", **kwargs).images
    ours = rollout(policy, prompts, seeds, eta=0.0, num_steps=10, guidance_scale=4.0)
    torch.testing.assert_close(ours.images, expected, atol=1e-5, rtol=1e-5)
    assert not ours.sde_mask.any()


def test_rollout_at_eta_one_equals_the_pipeline_with_ddim_eta_one(random_sd_dir, policy):
    """gDDIM at eta = 1 is diffusers' DDIM at eta = 1; with one generator per sample the noise is the same too."""
    pipeline = StableDiffusionPipeline.from_pretrained(random_sd_dir)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    prompts, seeds = ["a red circle", "a blue square"], [5, 6]
    expected = pipeline(
        prompts, num_inference_steps=8, guidance_scale=3.0, eta=1.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
    ).images  # fmt: skip
    ours = rollout(policy, prompts, seeds, eta=1.0, num_steps=8, guidance_scale=3.0)
    torch.testing.assert_close(ours.images, expected, atol=1e-4, rtol=1e-4)
    assert ours.sde_mask.all() and torch.isfinite(ours.log_probs).all()


@pytest.mark.parametrize("targets", ["attention", "blocks"])
def test_lora_round_trips_through_plain_diffusers(random_sd_dir, policy, tmp_path, targets):
    lora = LoraConfig(rank=4, alpha=8.0, **({"target_modules": UNET_BLOCKS} if targets == "blocks" else {}))
    if targets == "blocks":  # ResNet convolutions and feed-forward layers too
        policy = SDPolicy.load(ModelConfig(path=str(random_sd_dir)), lora)
        assert any("conv1.lora_A" in name for name, _ in policy.unet.named_parameters())
    for p in policy.trainable_parameters():  # a trained-looking adapter: non-zero LoRA B
        torch.nn.init.normal_(p, std=0.05)
    policy.save_adapter(tmp_path / "lora")
    mine = rollout(policy, ["a red circle", "three green triangles"], [1, 2], eta=0.0, num_steps=6, guidance_scale=4.0)

    pipeline = StableDiffusionPipeline.from_pretrained(random_sd_dir)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    base = pipeline(
        ["a red circle", "three green triangles"], num_inference_steps=6, guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt",
    ).images  # fmt: skip
    pipeline.load_lora_weights(tmp_path / "lora")
    loaded = pipeline(
        ["a red circle", "three green triangles"], num_inference_steps=6, guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt",
    ).images  # fmt: skip
    assert (base - mine.images).abs().max() > 1e-3  # the adapter changes the samples
    torch.testing.assert_close(loaded, mine.images, atol=1e-5, rtol=1e-5)

    fresh = SDPolicy.load(ModelConfig(path=str(random_sd_dir)), lora)
    fresh.load_adapter(tmp_path / "lora")
    for a, b in zip(fresh.trainable_parameters(), policy.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_training_step_changes_only_lora_parameters(policy):
    before = {name: p.detach().clone() for name, p in policy.unet.named_parameters()}
    frozen = {
        "vae": [p.detach().clone() for p in policy.vae.parameters()],
        "text": [p.detach().clone() for p in policy.text_encoder.parameters()],
    }
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    trajectory = rollout(policy, ["a red circle"] * 2, [0, 1], eta=1.0, num_steps=4, guidance_scale=2.0)
    steps = torch.tensor([1, 2])
    out = policy.predict(
        trajectory.latents[torch.arange(2), steps], trajectory.timesteps[steps], trajectory.prompt_embeds, 2.0
    )
    step = policy.step(
        out, 4, steps, trajectory.latents[torch.arange(2), steps], eta=1.0,
        prev_sample=trajectory.latents[torch.arange(2), steps + 1],
    )  # fmt: skip
    (-step.log_prob.mean()).backward()
    optimizer.step()
    changed = {name for name, p in policy.unet.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    assert len(changed) == len(policy.trainable_parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen["vae"], policy.vae.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(frozen["text"], policy.text_encoder.parameters(), strict=True))


def test_reference_disables_the_adapter(policy):
    for p in policy.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, *policy.latent_shape)
    embeds = policy.encode_prompts(["a red circle"])
    with torch.no_grad():
        adapted = policy.predict(x, torch.tensor(500), embeds, 1.0)
        with policy.reference():
            base = policy.predict(x, torch.tensor(500), embeds, 1.0)
        again = policy.predict(x, torch.tensor(500), embeds, 1.0)
    assert (adapted - base).abs().max() > 1e-4
    assert torch.equal(adapted, again)


def test_prompt_embeddings_are_cached(policy):
    first = policy.encode_prompts(["a red circle", "a blue square"])
    assert set(policy._prompt_cache) == {"a red circle", "a blue square"}
    assert torch.equal(policy.encode_prompts(["a blue square"])[0], first[1])


def test_the_model_loads_in_the_configured_dtype_without_a_deprecation_warning(random_sd_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = SDPolicy.load(ModelConfig(path=str(random_sd_dir), dtype="bfloat16"), LoraConfig(rank=4, alpha=8.0))
    assert [str(w.message) for w in caught if "torch_dtype" in str(w.message)] == []
    assert policy.vae.dtype == torch.bfloat16


def test_missing_or_wrong_model_directories_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model_path(str(tmp_path))
    assert (
        resolve_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5")
        == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def test_an_adapter_loads_from_a_checkpoint_folder_and_a_missing_one_is_a_clear_error(policy, tmp_path):
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save_adapter(tmp_path / "epoch-000003" / "adapter")
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.zero_()
    policy.load_adapter(tmp_path / "epoch-000003")  # the checkpoint's folder: its adapter/ is loaded
    for a, b in zip(policy.trainable_parameters(), before, strict=True):
        assert torch.equal(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors in .*empty.*training checkpoint"):
        policy.load_adapter(tmp_path / "empty")


def test_a_full_fine_tune_loads_its_network_from_a_checkpoint_folder(random_sd_dir, tmp_path):
    config = ModelConfig(path=str(random_sd_dir), full_finetune=True)
    trained = SDPolicy.load(config, LoraConfig())
    with torch.no_grad():
        next(trained.unet.parameters()).add_(1.0)
    trained.save_adapter(tmp_path / "epoch-000001" / "adapter")
    fresh = SDPolicy.load(config, LoraConfig())
    fresh.load_adapter(tmp_path / "epoch-000001")
    torch.testing.assert_close(next(fresh.unet.parameters()), next(trained.unet.parameters()), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"no unet/ folder \(a full fine-tune's weights\) in"):
        fresh.load_adapter(tmp_path)


def test_channels_last_is_the_same_policy_in_another_memory_layout(random_sd_dir, policy):
    assert policy.unet.conv_in.weight.is_contiguous()
    torch.manual_seed(0)
    nhwc = SDPolicy.load(ModelConfig(path=str(random_sd_dir), channels_last=True), LoraConfig(rank=4, alpha=8.0))
    conv = nhwc.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    ours, theirs = (rollout(p, prompts, seeds, eta=1.0, num_steps=6, guidance_scale=3.0) for p in (nhwc, policy))
    torch.testing.assert_close(ours.images, theirs.images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=1e-5, rtol=1e-5)


def test_noised_is_the_schedulers_forward_process_at_the_steps_timestep(policy):
    x0, noise = torch.randn(2, *policy.latent_shape), torch.randn(2, *policy.latent_shape)
    scheduler = DDIMScheduler.from_config(policy.scheduler.config)
    scheduler.set_timesteps(10)
    for index in (0, 9):
        expected = scheduler.add_noise(x0, noise, scheduler.timesteps[index : index + 1])
        torch.testing.assert_close(policy.noised(x0, 10, index, noise), expected, rtol=1e-5, atol=1e-6)


def test_noised_takes_a_step_per_sample_and_the_exact_noise_predicts_the_clean_sample(policy):
    x0, noise = torch.randn(2, *policy.latent_shape), torch.randn(2, *policy.latent_shape)
    index = torch.tensor([1, 8])  # not the first step: there sqrt(a) is tiny and x0 comes back through 1 / sqrt(a)
    x_t = policy.noised(x0, 10, index, noise)
    for row in (0, 1):
        one = policy.noised(x0[row : row + 1], 10, int(index[row]), noise[row : row + 1])
        torch.testing.assert_close(x_t[row], one[0])
    torch.testing.assert_close(policy.predicted_clean(noise, 10, index, x_t), x0, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(policy.predicted_clean(noise, 10, index.flip(0), x_t), x0, atol=1e-2)
