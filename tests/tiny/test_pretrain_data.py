"""The pretraining data set of ``scripts/pretrain_tiny.py``: which prompts' scenes and captions it holds."""

import importlib.util
import json
from pathlib import Path

import pytest

from diffrl.tiny.world import Looseness, load_prompts

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def pretrain_tiny():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", SCRIPTS / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved(work: Path) -> dict:
    return json.loads((work / "captions.json").read_text())


def test_training_scenes_never_show_or_name_a_held_out_prompt(pretrain_tiny, tmp_path):
    images, texts = pretrain_tiny.render_dataset(tmp_path, 300, seed=1, looseness=Looseness(), scenes="train")
    assert tuple(images.shape) == (300, 64, 64, 3)
    heldout, train = set(load_prompts("heldout")), set(load_prompts("train"))
    assert set(_saved(tmp_path)["scenes"]) <= train
    assert not heldout & set(texts)


def test_the_whole_grammar_shows_held_out_scenes_and_refuses_a_work_dir_of_the_other_set(pretrain_tiny, tmp_path):
    _, texts = pretrain_tiny.render_dataset(tmp_path, 300, seed=1, looseness=Looseness(), scenes="all")
    heldout = set(load_prompts("heldout"))
    scenes = _saved(tmp_path)["scenes"]
    assert heldout & set(scenes), "no held-out scene in 300 of the whole grammar"
    assert heldout & set(texts), "no held-out caption in 300 of the whole grammar"
    # resuming reuses the saved set; a work dir of the other set is refused instead of silently mixed
    _, again = pretrain_tiny.render_dataset(tmp_path, 300, seed=1, looseness=Looseness(), scenes="all")
    assert again == texts
    with pytest.raises(SystemExit, match="--scenes all"):
        pretrain_tiny.render_dataset(tmp_path, 300, seed=1, looseness=Looseness(), scenes="train")


def test_a_work_dir_of_other_captions_is_refused_and_one_saved_before_a_new_field_is_reused(pretrain_tiny, tmp_path):
    exact = Looseness(mismatch=0.0)
    _, texts = pretrain_tiny.render_dataset(tmp_path, 50, seed=1, looseness=exact, scenes="train")
    with pytest.raises(SystemExit, match="holds scenes captioned with"):
        pretrain_tiny.render_dataset(tmp_path, 50, seed=1, looseness=Looseness(mismatch=0.5), scenes="train")
    # a data set saved before Looseness had `mismatch` was captioned without it, whatever the default is now
    saved = _saved(tmp_path)
    del saved["looseness"]["mismatch"]
    (tmp_path / "captions.json").write_text(json.dumps(saved))
    _, again = pretrain_tiny.render_dataset(tmp_path, 50, seed=1, looseness=exact, scenes="train")
    assert again == texts
    with pytest.raises(SystemExit, match="holds scenes captioned with"):
        pretrain_tiny.render_dataset(tmp_path, 50, seed=1, looseness=Looseness(mismatch=0.5), scenes="train")
    del saved["looseness"]
    (tmp_path / "captions.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="holds scenes captioned with None"):
        pretrain_tiny.render_dataset(tmp_path, 50, seed=1, looseness=exact, scenes="train")
