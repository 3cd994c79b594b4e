import os
import subprocess
import sys

import pytest

LOAD = """
from diffrl import policies
from diffrl.config import Config, apply_overrides
policies.load(apply_overrides(Config(), ["--model.path", {path!r}, "--logging.progress_bars", {bars!r}]))
"""


@pytest.mark.parametrize("bars", ["true", "false"])
def test_loading_a_model_prints_no_torchvision_warning_and_bars_only_when_asked(random_sd_dir, bars):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = LOAD.format(path=str(random_sd_dir), bars=bars)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "requires torchvision" not in result.stderr
    assert ("Loading pipeline components" in result.stderr) == (bars == "true")
