"""A micro eta sweep (2 etas x 1 seed, one epoch each) on a tiny random SD, its table, and the reports."""

import csv
import json
import re
import shutil

import pytest
from PIL import Image

import diffrl.trainers
from diffrl.cli import main as cli_main
from diffrl.cli import parse_seeds
from diffrl.config import ConfigError
from diffrl.grids import LABEL_WIDTH
from diffrl.report import main as report_main
from diffrl.sweep import run_sweep

OVERRIDES = ["--train.epochs", "1", "--eval.every_epochs", "1", "--eval.num_prompts", "3", "--eval.grid_prompts", "2"]


@pytest.fixture(scope="module")
def sweep(random_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    recipe = root / "recipe.py"
    recipe.write_text(
        "from tiny_run import small_config\n\n\n"
        f"def config():\n    return small_config({str(random_sd_dir)!r}, 'unused')\n"
    )
    out = root / "out"
    rows = run_sweep(str(recipe), [0.5, 1.0], [0], out, OVERRIDES, [2, 4])
    return recipe, out, rows


def test_sweep_trains_each_eta_and_tabulates_ode_sde_and_gap(sweep):
    _, out, rows = sweep
    assert [(r["eta"], r["steps"], r["seeds"]) for r in rows] == [(0.5, 2, 1), (0.5, 4, 1), (1.0, 2, 1), (1.0, 4, 1)]
    for eta in (0.5, 1.0):
        run = out / f"eta={eta:g}" / "seed=0"
        config = json.loads((run / "config.json").read_text())
        assert config["sample"]["eta"] == eta and config["train"]["seed"] == 0
        result = json.loads((run / "result.json").read_text())
        for cell in result["steps"].values():
            assert cell["gap"] == pytest.approx(cell["ode"] - cell["sde"])
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and float(table[0]["gap_mean"]) == pytest.approx(rows[0]["gap_mean"])
    assert "| 0.5 | 2 | 1 |" in (out / "sweep.md").read_text()
    # the base-policy gap comes from the run's first evaluation, at the training evaluation's step count (20)
    assert all("base_gap_mean" not in r for r in rows)


def test_rerunning_a_finished_sweep_trains_nothing(sweep, monkeypatch, capsys):
    recipe, out, _ = sweep

    def no_training(*args, **kwargs):
        raise AssertionError("a finished sweep must not train again")

    monkeypatch.setattr(diffrl.trainers, "train", no_training)
    argv = ["sweep", str(recipe), "--eta", "0.5,1", "--seeds", "1", "--eval-steps", "2,4", "--out", str(out)]
    assert cli_main(argv + OVERRIDES) == 0
    assert capsys.readouterr().out.count("is done; skipped") == 2
    with pytest.raises(ConfigError, match="holds a sweep with overrides"):
        run_sweep(str(recipe), [0.5], [0], out, [*OVERRIDES, "--train.lr", "1e-4"], [2, 4])


def test_evaluation_grids_and_reports(sweep):
    _, out, _ = sweep
    run = out / "eta=1" / "seed=0"
    grids = sorted((run / "samples").glob("epoch-*.png"))
    assert [g.name for g in grids] == ["epoch-000000.png", "epoch-000001.png"]
    with Image.open(grids[-1]) as grid:  # rows: the ODE and the training sampler; columns: 2 prompts
        assert grid.size[0] == LABEL_WIDTH + 2 * (128 + 2) and grid.size[1] > 2 * (128 + 2)  # 64 px tiles, twice
    assert report_main([str(run)]) == 0
    page = (run / "report" / "report.md").read_text()
    for name in ("rewards.png", "gap.png", "diagnostics.png", "epoch-000001.png"):
        assert f"]({name})" in page and (run / "report" / name).is_file()
    assert "| `eval/shapes/ode/mean` |" in page and "| `sample.eta` | `1.0` |" in page  # numbers and config
    html_page = (run / "report" / "report.html").read_text()
    embedded = re.findall(r'<figure data-figure="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,', html_page)
    assert embedded == re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)  # every figure of the page, embedded in it
    assert "<td><code>eval/shapes/gap</code></td>" in html_page and 'src="http' not in html_page
    assert report_main([str(out)]) == 0
    page = (out / "report" / "report.md").read_text()
    for name in ("sweep-steps2.png", "sweep-steps4.png", "sweep-training.png", "eta=0.5-seed=0-epoch-000001.png"):
        assert f"]({name})" in page and (out / "report" / name).is_file()
        assert f'data-figure="{name}"' in (out / "report" / "report.html").read_text()
    assert "| training eta | steps | seeds |" in page


def test_report_of_a_folder_without_metrics_says_so(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().out


def test_diffrl_eval_of_a_checkpoint_reproduces_the_sweeps_evaluation(sweep, tmp_path):
    _, out, _ = sweep
    run = out / "eta=0.5" / "seed=0"
    argv = ["eval", "--checkpoint", str(run), "--steps", "2,4", "--out", str(tmp_path / "e.json")]
    assert cli_main(argv) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())
    result = json.loads((run / "result.json").read_text())
    for steps in ("2", "4"):  # same prompts, same per-prompt noise, same LoRA: the same numbers
        assert metrics[steps]["eval/shapes/ode/mean"] == pytest.approx(result["steps"][steps]["ode"], abs=1e-6)
        sde = metrics[steps]["eval/shapes/train_sampler/mean"]
        assert sde == pytest.approx(result["steps"][steps]["sde"], abs=1e-6)
        assert metrics[steps]["eval/shapes/gap"] == pytest.approx(result["steps"][steps]["gap"], abs=1e-6)


def test_diffrl_eval_reports_a_missing_checkpoint(tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "diffrl eval:" in capsys.readouterr().err


def test_the_sweep_and_gap_evaluation_run_unchanged_on_flux(random_flux_dir, tmp_path):
    recipe = tmp_path / "flux_recipe.py"
    recipe.write_text(
        "from tiny_run import small_config\nfrom diffrl.config import apply_overrides\n\n\n"
        "def config():\n"
        f"    return apply_overrides(small_config({str(random_flux_dir)!r}, 'unused'), [\n"
        "        '--model.family', 'flux', '--model.resolution', '32', '--model.max_sequence_length', '16',\n"
        "        '--reward.spec', 'jpeg_compressibility'])\n"
    )
    rows = run_sweep(str(recipe), [1.0, 1.5], [0], tmp_path / "out", OVERRIDES, [2, 4])
    assert [(r["eta"], r["steps"]) for r in rows] == [(1.0, 2), (1.0, 4), (1.5, 2), (1.5, 4)]
    for eta in (1.0, 1.5):
        result = json.loads((tmp_path / "out" / f"eta={eta:g}" / "seed=0" / "result.json").read_text())
        for cell in result["steps"].values():
            assert cell["gap"] == pytest.approx(cell["ode"] - cell["sde"], abs=1e-6)  # float32 means
    assert (tmp_path / "out" / "sweep.md").exists()


def test_report_skips_a_torn_metrics_line(sweep, tmp_path, capsys):
    _, out, _ = sweep
    run = tmp_path / "run"
    shutil.copytree(out / "eta=1" / "seed=0", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "reward/me')  # a kill in the middle of a write
    assert report_main([str(run)]) == 0
    assert "skipped 1 line(s) that are not whole metrics records" in capsys.readouterr().out
    assert (run / "report" / "report.md").is_file()


def test_wall_clock_minutes_add_every_timed_phase_of_every_epoch():
    from diffrl.report import wall_minutes

    metrics = [
        {"epoch": 0, "time/eval_s": 60.0},
        {"epoch": 1, "time/sampling_s": 30.0, "time/training_s": 30.0, "reward/mean": 0.5},
        {"epoch": 2, "time/sampling_s": 30.0, "time/training_s": 30.0, "time/eval_s": 60.0},
    ]
    assert wall_minutes(metrics) == {0: 1.0, 1: 2.0, 2: 4.0}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_sweep_runs_unchanged_on_sdxl_and_sd3(family, random_sdxl_dir, random_sd3_dir, tmp_path):
    path = random_sdxl_dir if family == "sdxl" else random_sd3_dir
    extra = "" if family == "sdxl" else ", '--lora.target_modules', ','.join(FLUX_ATTENTION)"
    recipe = tmp_path / f"{family}_recipe.py"
    recipe.write_text(
        "from tiny_run import small_config\nfrom diffrl.config import FLUX_ATTENTION, apply_overrides\n\n\n"
        "def config():\n"
        f"    return apply_overrides(small_config({str(path)!r}, 'unused'), [\n"
        f"        '--model.family', {family!r}, '--reward.spec', 'jpeg_compressibility'{extra}])\n"
    )
    rows = run_sweep(str(recipe), [1.0, 1.5], [0], tmp_path / "out", OVERRIDES, [2])
    assert [(r["eta"], r["steps"]) for r in rows] == [(1.0, 2), (1.5, 2)]
    assert report_main([str(tmp_path / "out")]) == 0


def test_sweep_seeds_are_a_count_or_a_list_and_zero_is_an_error(capsys):
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,2") == [0, 2]
    assert parse_seeds("0,") == [0]
    for text in ("0", ","):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(text)
    assert cli_main(["sweep", "recipe.py", "--eta", "1", "--seeds", "0"]) == 2
    assert "for seed 0 alone pass a list: --seeds 0," in capsys.readouterr().err
