"""Every shell and Python block of README.md runs as written, in order, in one scratch folder, against the real
mirror. Blocks whose first line is ``# needs: ...`` (setup, a GPU, a cluster) are skipped, except ``# needs: ray``
blocks (a two-node Ray cluster on this machine), which run wherever Ray can (always under CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, ray_problem

BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_readme_has_runnable_blocks():
    runnable = [code for _, code in BLOCKS if not code.startswith("# needs:")]
    assert len(runnable) >= 8


@pytest.mark.real_data
@pytest.mark.slow
def test_every_readme_command_runs(mirror, tmp_path):
    env = {**os.environ, "FEATX_MIRROR": str(mirror), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for language, block in BLOCKS:
        if block.startswith("# needs: ray"):
            if ray_problem():
                if os.environ.get("FEATX_REQUIRE_RAY") == "1":
                    pytest.fail(ray_problem())
                continue
        elif block.startswith("# needs:"):
            continue
        command = ["bash", "-euo", "pipefail", "-c", block] if language == "bash" else [sys.executable, "-c", block]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr[-3000:]}"
    assert (tmp_path / "predictions.csv").is_file() and (tmp_path / "sheet.png").is_file()
    assert (tmp_path / "runs" / "ft" / "curves.png").is_file()
