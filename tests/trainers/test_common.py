import math

import pytest
import torch

from diffrl.trainers.common import (
    EPS,
    PerPromptStatTracker,
    clip_advantages,
    clipped_surrogate_loss,
    gaussian_kl,
    group_advantages,
    score_function_loss,
    subsample_timesteps,
)


def test_clipped_surrogate_known_values():
    # advantage -1, ratio 1 -> loss 1
    out = clipped_surrogate_loss(torch.zeros(1), torch.zeros(1), torch.tensor([-1.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(1.0)
    assert out.ratio_mean.item() == 1.0 and out.clip_fraction.item() == 0.0
    # positive advantage, ratio above 1 + c: clipped at 1 + c -> loss -A (1 + c)
    log_ratio = math.log(1.5)
    out = clipped_surrogate_loss(torch.tensor([log_ratio]), torch.zeros(1), torch.tensor([2.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(-2.0 * 1.2)
    assert out.clip_fraction.item() == 1.0
    # negative advantage, ratio above 1 + c: the unclipped term is larger -> loss -A r = 1.5
    out = clipped_surrogate_loss(torch.tensor([log_ratio]), torch.zeros(1), torch.tensor([-1.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(1.5)
    # negative advantage, ratio below 1 - c: clipped -> -A (1 - c) = 0.8
    out = clipped_surrogate_loss(torch.tensor([math.log(0.5)]), torch.zeros(1), torch.tensor([-1.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(0.8)
    # the mean over a batch
    out = clipped_surrogate_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -3.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(1.0)


def test_clipped_surrogate_gradient_vanishes_once_clipped():
    log_prob = torch.tensor([math.log(1.5)], requires_grad=True)
    clipped_surrogate_loss(log_prob, torch.zeros(1), torch.tensor([1.0]), 0.2).loss.backward()
    assert log_prob.grad.item() == 0.0
    log_prob = torch.tensor([0.0], requires_grad=True)
    clipped_surrogate_loss(log_prob, torch.zeros(1), torch.tensor([1.0]), 0.2).loss.backward()
    assert log_prob.grad.item() == pytest.approx(-1.0)


def test_score_function_loss():
    log_prob = torch.tensor([-2.0, -1.0], requires_grad=True)
    out = score_function_loss(log_prob, torch.tensor([1.0, -1.0]))
    assert out.loss.item() == pytest.approx((2.0 - 1.0) / 2)
    out.loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-0.5, 0.5])


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=3)
    std = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False).item()
    assert adv[:3].tolist() == pytest.approx([-1 / (std + EPS), 0.0, 1 / (std + EPS)], rel=1e-6)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # a group with one reward carries no signal
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(rewards, group_size=4)


def test_group_advantages_scaled_by_the_batch_std_or_not_at_all():
    rewards = torch.tensor([0.50, 0.51, 0.0, 1.0])
    by_group = group_advantages(rewards, group_size=2)
    small, large = 0.005 / (0.005 + EPS), 0.5 / (0.5 + EPS)  # a 0.01 difference counts almost as much as 1
    assert by_group.tolist() == pytest.approx([-small, small, -large, large], rel=1e-5)
    by_batch = group_advantages(rewards, group_size=2, scale="batch", batch_std=0.25)
    assert by_batch.tolist() == pytest.approx([-0.02, 0.02, -2.0, 2.0], rel=1e-3)
    unscaled = group_advantages(rewards, group_size=2, scale="none")
    assert unscaled.tolist() == pytest.approx([-0.005, 0.005, -0.5, 0.5], rel=1e-4)
    with pytest.raises(ValueError, match="needs batch_std"):
        group_advantages(rewards, group_size=2, scale="batch")


def test_group_advantages_leave_out_dropped_samples():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0])
    valid = torch.tensor([True, False, True, True])
    adv = group_advantages(rewards, group_size=2, valid=valid)
    assert adv[1].item() == 0.0 and adv[0].item() == 0.0  # the remaining member is alone in its group
    assert adv[2].item() > 0 > adv[3].item()
    assert torch.isfinite(adv).all()


def test_per_prompt_stat_tracker_uses_a_buffer_across_epochs():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 10.0]))
    # "a" has 2 rewards (>= min_count): its own mean 2 and std 1; "b" has 1: the batch's statistics
    assert adv[:2].tolist() == pytest.approx([-1 / (1 + EPS), 1 / (1 + EPS)], rel=1e-6)
    batch = torch.tensor([1.0, 3.0, 10.0])
    assert adv[2].item() == pytest.approx(((10.0 - batch.mean()) / (batch.std(unbiased=False) + EPS)).item())
    # next epoch: "a" normalises against its buffer [1, 3, 5, 7] (mean 4)
    adv = tracker.update(["a", "a"], torch.tensor([5.0, 7.0]))
    history = torch.tensor([1.0, 3.0, 5.0, 7.0])
    expected = (torch.tensor([5.0, 7.0]) - history.mean()) / (history.std(unbiased=False) + EPS)
    torch.testing.assert_close(adv, expected)
    # the buffer keeps the last 4
    tracker.update(["a"], torch.tensor([9.0]))
    assert list(tracker.buffers["a"]) == [3.0, 5.0, 7.0, 9.0]
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert {k: list(v) for k, v in restored.buffers.items()} == {k: list(v) for k, v in tracker.buffers.items()}


def test_clip_advantages():
    assert clip_advantages(torch.tensor([-9.0, 0.5, 9.0]), 5.0).tolist() == [-5.0, 0.5, 5.0]


def test_gaussian_kl_matches_torch_distributions():
    mean, ref = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    std = torch.full((3, 1, 1, 1), 0.3)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(ref, std)
    )
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "mean"), expected.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "sum"), expected.sum(dim=(1, 2, 3)))
    assert gaussian_kl(mean, mean, std, "mean").abs().max().item() == 0.0


def test_subsample_timesteps_only_picks_stochastic_steps():
    mask = torch.tensor([False, True, True, True, True, False])
    steps = subsample_timesteps(mask, batch_size=5, fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (5, 2)
    assert set(steps.flatten().tolist()) <= {1, 2, 3, 4}
    assert all(len(set(row)) == 2 for row in steps.tolist())
    full = subsample_timesteps(mask, batch_size=3, fraction=1.0, generator=torch.Generator().manual_seed(0))
    assert all(sorted(row) == [1, 2, 3, 4] for row in full.tolist())
    with pytest.raises(ValueError, match="no stochastic step"):
        subsample_timesteps(torch.zeros(4, dtype=torch.bool), 2, 1.0, torch.Generator())


def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_epoch():
    from diffrl.config import Config, apply_overrides
    from diffrl.trainers.base import lr_factor

    config = apply_overrides(
        Config(),
        ["--sample.batch_size", "8", "--sample.num_batches_per_epoch", "2", "--train.batch_size", "4",
         "--train.group_size", "4", "--train.epochs", "5", "--train.lr_warmup_steps", "2"],
    )  # fmt: skip
    constant = lr_factor(config)
    assert [constant(s) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]
    cosine = lr_factor(apply_overrides(config, ["--train.lr_schedule", "cosine"]))  # 4 updates x 5 epochs
    assert cosine(0) == 0.5 and cosine(2) == 1.0
    assert cosine(11) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0)


def test_optimality_probability_maps_clipped_advantages_onto_zero_one():
    from diffrl.trainers.common import optimality_probability

    r = optimality_probability(torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0]), max_abs=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="must be > 0"):
        optimality_probability(torch.zeros(1), max_abs=0.0)


def test_nft_loss_on_hand_made_inputs():
    from diffrl.trainers.common import nft_loss

    x0 = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    noise = torch.tensor([[0.5, 0.5], [-1.0, 1.0]])
    t = torch.tensor([0.5, 0.25])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    target = noise - x0  # the velocity that recovers x0 exactly
    old = target + torch.tensor([[0.4, -0.4], [0.2, 0.6]])  # the sampling policy is off by these
    velocity = (target + torch.tensor([[0.2, 0.0], [0.0, -0.2]])).requires_grad_(True)
    beta = 0.5
    out = nft_loss(x_t - t[:, None] * velocity, x_t - t[:, None] * old, x0, torch.tensor([1.0, 0.25]), beta)
    # by hand: v+ = beta v + (1 - beta) v_old is off by d+ = beta dv + (1 - beta) d_old; the x0 error is -t d+,
    # and a squared error over its own mean absolute error is mean(e^2) / mean(|e|)
    d_v, d_old = velocity.detach() - target, old - target
    for d, got in ((beta * d_v + (1 - beta) * d_old, out.positive), ((1 + beta) * d_old - beta * d_v, out.negative)):
        e = -t[:, None] * d
        torch.testing.assert_close(got, (e**2).mean(1) / e.abs().mean(1))
    torch.testing.assert_close(out.loss, (torch.tensor([1.0, 0.25]) * out.positive + torch.tensor([0.0, 0.75])
                                          * out.negative) / beta)  # fmt: skip
    # a sample with r = 1 moves v towards x0's velocity; gradients never reach the old policy
    out.loss[0].backward()
    assert velocity.grad[0, 0] > 0 and velocity.grad[1].abs().sum() == 0 and not old.requires_grad
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(x_t - t[:, None] * velocity, x_t - t[:, None] * old, x0, torch.ones(2), 0.0)
