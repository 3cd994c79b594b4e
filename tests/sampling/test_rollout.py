import pytest
import torch

from diffrl.config import LoraConfig, ModelConfig
from diffrl.policies.sd import SDPolicy
from diffrl.sampling.rollout import moving_window, rollout, sde_window_mask


@pytest.fixture(scope="module")
def policy(random_sd_dir):
    return SDPolicy.load(ModelConfig(path=str(random_sd_dir)), LoraConfig())


def test_same_seeds_give_the_same_initial_noise_under_every_eta(policy):
    prompts, seeds = ["a red circle", "a blue square", "two green circles"], [7, 8, 9]
    runs = [rollout(policy, prompts, seeds, eta=eta, num_steps=5, guidance_scale=2.0) for eta in (0.0, 1.0, 2.0)]
    for run in runs[1:]:
        assert torch.equal(run.latents[:, 0], runs[0].latents[:, 0])
    assert not torch.equal(runs[1].latents[:, -1], runs[0].latents[:, -1])
    # different seeds, different noise
    other = rollout(policy, prompts, [1, 2, 3], eta=0.0, num_steps=5, guidance_scale=2.0)
    assert not torch.equal(other.latents[:, 0], runs[0].latents[:, 0])


def test_trajectory_shapes_and_log_probs(policy):
    trajectory = rollout(policy, ["a red circle"] * 2, [0, 1], eta=1.0, num_steps=6, guidance_scale=2.0)
    assert trajectory.latents.shape == (2, 7, *policy.latent_shape)
    assert trajectory.log_probs.shape == (2, 6) and trajectory.timesteps.shape == (6,)
    assert trajectory.images.shape == (2, 3, 64, 64)
    assert trajectory.images.min() >= 0 and trajectory.images.max() <= 1
    assert trajectory.sde_mask.all() and torch.isfinite(trajectory.log_probs).all()


def test_sde_window_makes_only_its_steps_stochastic(policy):
    seeds = [4, 5]
    full_ode = rollout(policy, ["a red circle"] * 2, seeds, eta=0.0, num_steps=6, guidance_scale=2.0)
    windowed = rollout(
        policy, ["a red circle"] * 2, seeds, eta=1.0, num_steps=6, guidance_scale=2.0, sde_window=(2, 4)
    )
    assert windowed.sde_mask.tolist() == [False, False, True, True, False, False]
    assert (windowed.log_probs[:, [0, 1, 4, 5]] == 0).all() and (windowed.log_probs[:, 2:4] != 0).all()
    # the steps before the window are the ODE's, exactly
    assert torch.equal(windowed.latents[:, :3], full_ode.latents[:, :3])
    assert not torch.equal(windowed.latents[:, 3], full_ode.latents[:, 3])


def test_step_seeds_separate_initial_noise_from_step_noise(policy):
    a = rollout(policy, ["a red circle"] * 2, [3, 3], eta=1.0, num_steps=4, guidance_scale=2.0, step_seeds=[10, 11])
    assert torch.equal(a.latents[0, 0], a.latents[1, 0])
    assert not torch.equal(a.latents[0, -1], a.latents[1, -1])


def test_sde_window_mask_validation():
    assert sde_window_mask(4, None).all()
    with pytest.raises(ValueError, match="sde_window must satisfy"):
        sde_window_mask(4, (3, 6))


def test_the_window_moves_progressively_and_stops_at_the_end():
    positions = [moving_window((0, 4), 10, stride=2, shift_every=3, epoch=e) for e in range(14)]
    assert positions[:3] == [(0, 4)] * 3  # three epochs at each position
    assert positions[3] == (2, 6) and positions[6] == (4, 8) and positions[9] == (6, 10)
    assert positions[13] == (6, 10)  # the end of the window has reached the last step: it stays
    assert moving_window((0, 4), 10, stride=0, shift_every=1, epoch=50) == (0, 4)
    assert moving_window(None, 10, stride=2, shift_every=1, epoch=5) is None


def test_a_moving_window_needs_a_first_position():
    from diffrl.config import ConfigError, SampleConfig

    with pytest.raises(ConfigError, match="set sample.sde_window"):
        SampleConfig(window_stride=2)


def test_a_mirrored_row_takes_the_opposite_step_noise_with_the_same_log_probability(policy):
    prompts, seeds, step_seeds = ["a red circle"] * 3, [3, 3, 3], [10, 10, 11]
    kwargs = {"eta": 1.0, "num_steps": 4, "guidance_scale": 2.0, "sde_window": (0, 1)}
    plain = rollout(policy, prompts, seeds, step_seeds=step_seeds, **kwargs)
    pair = rollout(policy, prompts, seeds, step_seeds=step_seeds, mirror=[False, True, False], **kwargs)
    # the unmirrored rows are untouched
    assert torch.equal(pair.latents[[0, 2]], plain.latents[[0, 2]])
    # the mirrored row's first step lies opposite its twin's around the step's mean (the same initial noise)
    # (the mean is recomputed on the rollout's whole batch: a float32 UNet's output on a batch of one can differ by
    # 1e-4 with one thread)
    with torch.no_grad():
        embeds = policy.encode_prompts(prompts)
        x = plain.latents[:, 0]
        out = policy.step(policy.predict(x, plain.timesteps[0], embeds, 2.0), 4, 0, x, eta=1.0)
    twin, mirrored = plain.latents[0, 1] - out.mean[0], pair.latents[1, 1] - out.mean[0]
    assert torch.allclose(mirrored, -twin, atol=1e-5)
    assert not torch.allclose(pair.latents[1, -1], pair.latents[0, -1])
    # a Gaussian is symmetric: the pair is equally likely
    assert torch.allclose(pair.log_probs[1], pair.log_probs[0], atol=1e-6)
    with pytest.raises(ValueError, match="3 seeds but 2 mirror flags"):
        rollout(policy, prompts, seeds, mirror=[True, False], **kwargs)
