from pathlib import Path

import pytest

from diffrl.cli import load_recipe, main
from diffrl.config import Config
from diffrl.trainers.base import load_prompts

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.py"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_builds_a_valid_config(recipe):
    config = load_recipe(str(recipe))()
    assert isinstance(config, Config)
    config.validate()


def test_recipes_cover_both_algorithms_on_both_models():
    configs = {p.stem: load_recipe(str(p))() for p in RECIPES}
    assert configs["ddpo_sd15"].train.algorithm == "ddpo_is" and configs["ddpo_sd15"].sample.num_steps == 50
    assert configs["grpo_sd15"].train.algorithm == "grpo"
    assert configs["ddpo_tiny"].model.path == "tiny" and configs["grpo_tiny"].model.path == "tiny"
    assert configs["grpo_tiny"].reward.spec == "shapes"
    flux, flux_tiny = configs["grpo_flux"], configs["grpo_flux_tiny"]
    assert flux.model.family == flux_tiny.model.family == "flux" and flux_tiny.model.path == "tiny"
    assert flux.model.path == "black-forest-labs/FLUX.1-dev" and flux.sample.num_steps == 25
    assert flux.sample.sde_window == (0, 4) and flux.sample.window_stride == 1  # MixGRPO's moving window
    assert set(flux.reward.spec.replace("=", ",").split(",")) >= {"hpsv2", "pickscore"}


def test_cli_prints_the_resolved_config_and_rejects_bad_overrides(capsys):
    recipe = str(RECIPES[0])
    assert main(["train", recipe, "--print-config", "--sample.eta", "1.3"]) == 0
    assert '"eta": 1.3' in capsys.readouterr().out
    assert main(["train", recipe, "--sample.eta", "-2"]) == 2
    assert "sample.eta must be a finite number >= 0" in capsys.readouterr().err
    assert main(["train", "recipes/missing.py"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_names_prompts_that_load_and_tiny_ones_train_on_no_held_out_prompt(recipe, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # recipes find their prompt files from any working directory
    config = load_recipe(str(recipe))()
    train_prompts = load_prompts(config.prompts.train)
    assert train_prompts and load_prompts(config.prompts.eval)
    if config.model.path == "tiny":
        assert set(train_prompts) <= set(load_prompts("tiny:train"))
