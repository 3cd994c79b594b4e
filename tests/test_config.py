import json

import pytest

from diffrl.config import Config, ConfigError, SampleConfig, apply_overrides, describe


def test_overrides_are_typed_and_validated():
    config = apply_overrides(
        Config(),
        ["--sample.eta", "1.2", "--train.algorithm=ddpo_is", "--sample.sde_window", "2,6", "--lora.rank", "16"],
    )
    assert config.sample.eta == 1.2 and config.train.algorithm == "ddpo_is"
    assert config.sample.sde_window == (2, 6) and config.lora.rank == 16
    assert apply_overrides(config, ["--sample.sde_window", "none"]).sample.sde_window is None
    assert apply_overrides(config, ["--model.gradient_checkpointing", "true"]).model.gradient_checkpointing is True
    assert apply_overrides(config, ["--reward", "shapes=1,jpeg_compressibility=0.1"]).reward.spec == (
        "shapes=1,jpeg_compressibility=0.1"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--sample.etta", "1"], "unknown config key 'sample.etta'; did you mean 'sample.eta'"),
        (["--samples.eta", "1"], "unknown config key 'samples'; did you mean 'sample'"),
        (["--sample.eta", "abc"], "sample.eta must be a number"),
        (["--sample.eta", "-0.5"], "sample.eta must be a finite number >= 0"),
        (["--sample.eta", "nan"], "sample.eta must be a finite number >= 0"),
        (["--sample.eta", "0"], "sample.eta=0 samples deterministically"),
        (["--sample.num_steps", "0"], "sample.num_steps must be >= 1"),
        (["--sample.num_steps", "2.5"], "sample.num_steps must be an integer"),
        (["--lora.rank", "0"], "lora.rank must be a positive integer"),
        (["--train.group_size", "3"], r"sample.batch_size \(16\) must be a multiple of train.group_size \(3\)"),
        (["--train.algorithm", "ppo"], "train.algorithm must be one of"),
        (["--model.gradient_checkpointing", "maybe"], "must be true or false"),
        (["--sample.sde_window", "5,3"], "sample.sde_window must satisfy 0 <= start < end"),
        (["--train.batch_size", "5"], r"must be a multiple of train.batch_size \(5\)"),
        (["--sample.noise_schedule", "flow_grpo"], "is for flow models"),
        (["--train.algorithm", "ddpo_sf", "--train.num_inner_epochs", "2"], "ddpo_sf' is on-policy"),
        (["--eval.sde_etas", "0"], r"eval.sde_etas must be finite numbers > 0 \(the ODE is always evaluated\)"),
        (["--eval.patience", "2"], "eval.patience stops a run that has not beaten its best eval.best_metric"),
        (["--eval.best_metric", "shapes/ode/mean", "--eval.every_epochs", "0"], "eval.best_metric needs evaluations"),
        (["--eval.best_metric", "shapes/ode/mean", "--eval.patience", "-1"], "eval.patience must be >= 0"),
        (["--sample.eta"], "has no value"),
        (["sample.eta", "1"], "expected an override like"),
    ],
)
def test_bad_values_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_sections_validate_when_built():
    with pytest.raises(ConfigError, match="sample.batch_size must be >= 1"):
        SampleConfig(batch_size=0)


def test_a_config_saved_with_eval_etas_loads_as_sde_etas(tmp_path):
    data = Config().to_dict()
    del data["eval"]["sde_etas"]
    data["eval"]["etas"] = [0.0, 1.5]  # an earlier diffrl: the etas evaluated, the ODE among them
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Config.load(tmp_path / "old.json").eval.sde_etas == (1.5,)
    data["eval"]["etas"] = None  # its default: the ODE and the training eta, which are always evaluated now
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Config.load(tmp_path / "old.json").eval.sde_etas == ()


def test_save_and_load_round_trip(tmp_path):
    config = apply_overrides(Config(), ["--sample.eta", "1.5", "--reward.kwargs", '{"shapes": {}}'])
    config.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config


def test_loading_rejects_unknown_keys_and_wrong_types(tmp_path):
    data = Config().to_dict()
    data["sample"]["temperature"] = 1.0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown config key 'sample.temperature'"):
        Config.load(tmp_path / "bad.json")
    data = Config().to_dict()
    data["train"]["epochs"] = "ten"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        Config.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.json")


def test_describe_lists_every_key_with_help():
    text = describe()
    assert "--sample.eta (default 1.0): sampler stochasticity" in text
    assert "--train.batch_size (default 8): trajectories per gradient micro-batch, per process" in text
