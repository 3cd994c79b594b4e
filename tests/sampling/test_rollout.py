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
