import math
from pathlib import Path

import pytest
import torch

from diffrl.rewards import RewardError, build_reward, parse_reward_spec, weighted_sum
from diffrl.rewards.jpeg import jpeg_sizes_kb
from diffrl.rewards.registry import reward_parts

REPO = Path(__file__).resolve().parents[2]


def images(batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_registry_names_build_rewards():
    reward = build_reward("jpeg_incompressibility")
    scores = reward(images(), ["a"] * 3, [{}] * 3)
    torch.testing.assert_close(scores, jpeg_sizes_kb(images()))
    torch.testing.assert_close(build_reward("jpeg_compressibility")(images(), ["a"] * 3, [{}] * 3), -scores)


def test_jpeg_size_grows_with_detail():
    flat = torch.full((1, 3, 64, 64), 0.5)
    assert jpeg_sizes_kb(images(1)).item() > 3 * jpeg_sizes_kb(flat).item()


def test_module_and_file_targets_resolve():
    reward = build_reward("rewards_helpers:constant_reward")
    torch.testing.assert_close(reward(images(2), ["a", "b"], [{}, {}]), torch.full((2,), 0.5))
    brightness = build_reward(f"{REPO}/rewards/example_reward.py:brightness")
    torch.testing.assert_close(brightness(images(), ["a"] * 3, [{}] * 3), images().mean(dim=(1, 2, 3)))


def test_unknown_or_missing_targets_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match=r"unknown reward 'pickscor'.*registry name"):
        build_reward("pickscor")
    with pytest.raises(FileNotFoundError, match=r"reward file .*missing.py' does not exist"):
        build_reward(str(tmp_path / "missing.py") + ":fn")
    with pytest.raises(ValueError, match=r"has no 'nope'.*it defines: brightness"):
        build_reward(f"{REPO}/rewards/example_reward.py:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_reward("no_such_module:fn")


def test_reward_file_is_executed_only_when_named(tmp_path):
    marker = tmp_path / "ran"
    source = (
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n"
        "def r(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    (tmp_path / "side_effect.py").write_text(source)
    weighted_sum("jpeg_compressibility")
    assert not marker.exists()
    build_reward(f"{tmp_path / 'side_effect.py'}:r")
    assert marker.exists()


def test_parse_reward_spec():
    assert parse_reward_spec("pickscore=1.0,jpeg_compressibility=0.1") == {
        "pickscore": 1.0,
        "jpeg_compressibility": 0.1,
    }
    assert parse_reward_spec("shapes") == {"shapes": 1.0}
    assert parse_reward_spec("rewards/x.py:fn=2") == {"rewards/x.py:fn": 2.0}
    assert reward_parts("pickscore=0.5,bright=/abs/rewards/x.py:fn=2,mine.rewards:score,http://127.0.0.1:8765") == [
        ("pickscore", "pickscore", 0.5),
        ("bright", "/abs/rewards/x.py:fn", 2.0),
        ("score", "mine.rewards:score", 1.0),  # stable names: no path or port in a metric key
        ("remote", "http://127.0.0.1:8765", 1.0),
    ]
    for bad, message in [
        ("a,,b", "empty reward name"),
        ("a,a", "both named 'a'"),
        ("x.py:fn,y.py:fn", "both named 'fn'; name them apart"),
        ("my name=shapes", "write NAME=SPEC with a name of letters"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_reward_spec(bad)
    with pytest.raises(ValueError, match="must be finite"):
        parse_reward_spec("a=nan")


def test_weighted_sum_arithmetic_and_parts():
    def ones(images, prompts, metadata):
        return torch.ones(images.shape[0])

    def index(images, prompts, metadata):
        return torch.arange(images.shape[0], dtype=torch.float32)

    combined = weighted_sum({ones: 0.5, index: 2.0, "jpeg_incompressibility": 0.1})
    out = combined.score(images(), ["p"] * 3)
    expected = 0.5 + 2.0 * torch.arange(3.0) + 0.1 * jpeg_sizes_kb(images())
    torch.testing.assert_close(out.total, expected)
    assert set(out.parts) == {"ones", "index", "jpeg_incompressibility"}
    torch.testing.assert_close(out.parts["index"], torch.arange(3.0))
    torch.testing.assert_close(combined(images(), ["p"] * 3, [{}] * 3), expected)


def test_weighted_sum_passes_kwargs_to_registry_rewards():
    combined = weighted_sum("jpeg_incompressibility", kwargs={"jpeg_incompressibility": {"quality": 10}})
    torch.testing.assert_close(combined(images(), ["p"] * 3), jpeg_sizes_kb(images(), quality=10))
    with pytest.raises(ValueError, match="not among the rewards"):
        weighted_sum("jpeg_incompressibility", kwargs={"shapes": {}})
    renamed = weighted_sum("jpeg=jpeg_incompressibility", kwargs={"jpeg": {"quality": 10}})
    assert renamed.names == ["jpeg"]
    torch.testing.assert_close(renamed(images(), ["p"] * 3), jpeg_sizes_kb(images(), quality=10))


def bad_shape(images, prompts, metadata):
    return torch.ones(images.shape[0], 1)


def with_nan(images, prompts, metadata):
    scores = torch.ones(images.shape[0])
    scores[1] = math.nan
    return scores


def raises(images, prompts, metadata):
    raise KeyError("model not loaded")


def returns_list(images, prompts, metadata):
    return [1.0] * images.shape[0]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (bad_shape, r"reward 'bad_shape' \(batch 4\) returned shape \(3, 1\) for 3 images"),
        (with_nan, r"reward 'with_nan' returned non-finite scores for samples \[1\] of 3 in batch 4"),
        (raises, r"reward 'raises' \(batch 4\) raised KeyError"),
        (returns_list, r"reward 'returns_list' \(batch 4\) returned list"),
    ],
)
def test_bad_reward_output_raises_naming_the_reward_and_batch(reward, message):
    with pytest.raises(RewardError, match=message):
        weighted_sum({reward: 1.0}).score(images(), ["p"] * 3, batch_index=4)


def test_non_finite_samples_can_be_dropped_and_counted():
    combined = weighted_sum({with_nan: 1.0}, on_invalid="drop")
    out = combined.score(images(), ["p"] * 3)
    assert out.valid.tolist() == [True, False, True] and out.num_dropped == 1
    assert math.isnan(out.total[1]) and out.total[0] == 1.0
    combined.score(images(), ["p"] * 3)
    assert combined.num_dropped == 2
    with pytest.raises(RewardError, match="returned shape"):  # a wrong shape is never dropped silently
        weighted_sum({bad_shape: 1.0}, on_invalid="drop").score(images(), ["p"] * 3)


def test_a_part_of_weight_zero_is_watched_not_differentiated():
    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    reward = weighted_sum({brightness: 1.0, "shapes": 0.0})
    images = torch.full((2, 3, 64, 64), 0.5, requires_grad=True)
    total, parts = reward.differentiable(images, ["a red circle"] * 2)
    assert set(parts) == {"brightness", "shapes"} and not parts["shapes"].requires_grad
    torch.testing.assert_close(total, parts["brightness"])  # the watched part adds nothing
    total.sum().backward()
    assert images.grad is not None
    with pytest.raises(RewardError, match="'shapes' is not differentiable"):
        weighted_sum({brightness: 1.0, "shapes": 0.5}).differentiable(images, ["a red circle"] * 2)

    def broken(images, prompts, metadata):
        return torch.full((len(prompts),), math.nan)

    with pytest.raises(RewardError, match="'broken' returned non-finite"):  # watched parts are checked all the same
        weighted_sum({brightness: 1.0, broken: 0.0}).differentiable(images, ["a red circle"] * 2)
