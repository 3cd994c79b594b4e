import json

import pytest
import torch

from diffrl.checkpoint import (
    CorruptCheckpointError,
    config_differences,
    find_checkpoint,
    save_checkpoint,
    saved_config,
    verify_checkpoint,
)
from diffrl.config import Config


class FakePolicy:
    def save_adapter(self, directory):
        directory.mkdir(parents=True)
        (directory / "weights.bin").write_bytes(b"\x00" * 64)


def save(tmp_path, epoch, keep_last=2):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(
        tmp_path, epoch=epoch, policy=FakePolicy(), optimizer=optimizer, lr_scheduler=scheduler, config=Config(),
        state={"global_step": epoch * 2}, keep_last=keep_last,
    )  # fmt: skip


def test_checkpoints_are_complete_and_pruned(tmp_path):
    for epoch in (1, 2, 3):
        save(tmp_path, epoch)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-000002", "epoch-000003"]
    latest = find_checkpoint(tmp_path, "latest")
    assert latest.name == "epoch-000003"
    verify_checkpoint(latest)
    assert json.loads((latest / "trainer_state.json").read_text()) == {"epoch": 3, "global_step": 6}


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (newest / "adapter" / "weights.bin").write_bytes(b"\x01" * 64)
    with pytest.raises(CorruptCheckpointError, match="does not match its checksum"):
        verify_checkpoint(newest)
    with pytest.warns(UserWarning, match="Using the previous checkpoint"):
        assert find_checkpoint(tmp_path, "latest").name == "epoch-000001"


@pytest.mark.parametrize(
    "manifest",
    [{}, {"files": {}}, {"files": []}, [], {"files": {"config.json": {"size": "big"}}}],
    ids=["empty object", "no files", "files not a mapping", "not an object", "entry without checksum"],
)
def test_a_damaged_manifest_is_corrupt_and_latest_falls_back(tmp_path, manifest):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="damaged manifest.json"):
        verify_checkpoint(newest)
    with pytest.warns(UserWarning, match="Using the previous checkpoint"):
        assert find_checkpoint(tmp_path, "latest").name == "epoch-000001"


def test_a_manifest_that_leaves_out_a_required_file_is_corrupt(tmp_path):
    newest = save(tmp_path, 1)
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"]["optimizer.safetensors"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="no entry for optimizer.safetensors"):
        verify_checkpoint(newest)


def test_only_damaged_checkpoints_say_so_instead_of_asking_for_a_fresh_start(tmp_path):
    newest = save(tmp_path, 1)
    (newest / "manifest.json").write_text("{}")
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="none of the 1 checkpoint"):
        find_checkpoint(tmp_path, "latest")


def test_a_checkpoint_without_manifest_is_incomplete(tmp_path):
    newest = save(tmp_path, 1)
    (newest / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="not completed"):
        verify_checkpoint(newest)


def test_resume_latest_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under .* start the run without --resume"):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path, str(tmp_path / "nope"))


def test_a_failed_write_leaves_no_partial_checkpoint(tmp_path):
    class FailingPolicy:
        def save_adapter(self, directory):
            directory.mkdir(parents=True)
            (directory / "half.bin").write_bytes(b"\x00")
            raise OSError(28, "No space left on device")

    save(tmp_path, 1)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError, match="no space left on the disk .*epoch-000001. is intact.*--resume latest"):
        save_checkpoint(
            tmp_path, epoch=2, policy=FailingPolicy(), optimizer=optimizer,
            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), config=Config(),
            state={}, keep_last=2,
        )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-000001"]
    verify_checkpoint(tmp_path / "checkpoints" / "epoch-000001")


def test_a_config_saved_before_a_key_existed_differs_only_where_it_really_differs(tmp_path):
    saved = Config().to_dict()
    del saved["model"]["init_weights"]  # a run written by a diffrl without this key
    saved["train"]["lr"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert "model.init_weights" in config_differences(saved, Config().to_dict())  # the raw dicts would differ
    assert config_differences(saved_config(tmp_path), Config().to_dict()) == ["train.lr"]
