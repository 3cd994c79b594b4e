from pathlib import Path

import pytest

from diffrl.cli import main
from diffrl.config import Config, apply_overrides
from diffrl.loading import load_eval_prompts, load_prompts, load_recipe
from diffrl.tiny.world import parse

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


def test_diffrl_config_shows_a_recipes_values_and_writes_a_config_file_train_reads(capsys, tmp_path):
    recipe = str(REPO / "recipes" / "grpo_tiny.py")
    expected = load_recipe(recipe)()
    assert main(["config", recipe, "--sample.eta", "1.3"]) == 0
    shown = capsys.readouterr().out
    assert "--sample.eta 1.3; library default 1.0:" in shown  # the recipe's value, not the library default
    assert f"--logging.output_dir {expected.logging.output_dir!r}; library default 'runs/diffrl'" in shown
    assert "--sample.num_steps 20: " in shown  # a value the recipe leaves at the default says nothing more
    assert main(["config", recipe, "--yaml"]) == 0
    (tmp_path / "run.yaml").write_text(capsys.readouterr().out)
    assert Config.load(tmp_path / "run.yaml") == expected  # a YAML file diffrl train --config reads back
    assert main(["config", recipe, "--json", "--train.seed", "7"]) == 0
    (tmp_path / "run.json").write_text(capsys.readouterr().out)
    assert Config.load(tmp_path / "run.json").train.seed == 7
    assert main(["config"]) == 0 and "(default 1.0)" in capsys.readouterr().out  # no recipe: the library defaults
    assert main(["config", "recipes/missing.py"]) == 2 and "does not exist" in capsys.readouterr().err


def test_diffrl_version(capsys):
    from diffrl import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"diffrl {__version__}"


def test_a_runs_held_out_subset_spans_the_list_and_so_every_kind(tmp_path):
    listed = tmp_path / "eval.txt"
    listed.write_text("".join(f"prompt {i}\n" for i in range(10)))
    config = apply_overrides(Config(), ["--prompts.eval", str(listed), "--eval.num_prompts", "4"])
    assert load_eval_prompts(config) == ["prompt 0", "prompt 2", "prompt 5", "prompt 7"]
    for n in (0, 10, 11):
        assert load_eval_prompts(apply_overrides(config, ["--eval.num_prompts", str(n)])) == load_prompts(str(listed))
    # the embedded held-out list is grouped by kind: 64 of its 189 prompts take each kind in its share
    tiny = load_eval_prompts(apply_overrides(Config(), ["--prompts.eval", "tiny:heldout", "--eval.num_prompts", "64"]))
    positions = sum(parse(p).kind == "position" for p in tiny)
    assert len(set(tiny)) == 64 and 44 <= positions <= 54  # 144 of 189 are position prompts
