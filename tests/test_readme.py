"""Every shell and Python block of README.md runs as written, in order, in one scratch folder, against the real
mirror. ``# needs: ray`` blocks (a two-node Ray cluster on this machine) and ``# needs: s3`` blocks (a local S3
server) run wherever they can (always under CI).
The few blocks that cannot run here are listed in ``NOT_RUN_HERE`` with why; any other ``# needs:`` block fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, ray_problem, s3_problem

BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
RUN_WHERE_POSSIBLE = {"# needs: ray": (ray_problem, "FEATX_REQUIRE_RAY"),  # a block's first line -> (why it cannot
                      "# needs: s3": (s3_problem, "FEATX_REQUIRE_S3")}     # run here, or None; what CI sets)
NOT_RUN_HERE = {  # a block's first line -> why this test does not run it, and what runs it instead
    "# needs: setup": "`make demo` and `make test` build .venv, the environment this test runs in: .ci/run runs both "
                      "on a clean clone, and tests/test_demo.py runs the demo's job",
    "# needs: facebook/dinov2-small": "a download from the Hugging Face hub (no network here): tests/test_hf.py "
                                      "reads hf: repositories from a hub cache in a mirror",
}


def _first_line(block: str) -> str:
    return block.splitlines()[0]


def test_the_readme_has_runnable_blocks():
    runnable = [code for _, code in BLOCKS if not code.startswith("# needs:")]
    assert len(runnable) >= 8


def test_every_block_not_run_here_says_why():
    needs = [_first_line(code) for _, code in BLOCKS if code.startswith("# needs:") and
             not code.startswith(tuple(RUN_WHERE_POSSIBLE))]
    unlisted = [line for line in needs if not any(line.startswith(key) for key in NOT_RUN_HERE)]
    assert not unlisted, f"README blocks no test runs: {unlisted}; run them, or list them in NOT_RUN_HERE with why"
    assert all(any(line.startswith(key) for line in needs) for key in NOT_RUN_HERE), "a listed block is gone"


@pytest.mark.real_data
@pytest.mark.slow
def test_every_readme_command_runs(mirror, tmp_path):
    env = {**os.environ, "FEATX_MIRROR": str(mirror), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ran, cannot = 0, set()
    for language, block in BLOCKS:
        need = next((need for need in RUN_WHERE_POSSIBLE if block.startswith(need)), None)
        problem, required_by = RUN_WHERE_POSSIBLE.get(need, (lambda: None, ""))
        if problem():
            if os.environ.get(required_by) == "1":
                pytest.fail(problem())
            cannot.add(need)  # outside `make test`'s namespace: the rest still runs
            continue
        if block.startswith("# needs:") and not need:
            continue
        command = ["bash", "-euo", "pipefail", "-c", block] if language == "bash" else [sys.executable, "-c", block]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr[-3000:]}"
        ran += 1
    assert ran == len(BLOCKS) - len(NOT_RUN_HERE) - sum(block.startswith(tuple(cannot)) for _, block in BLOCKS)
    assert (tmp_path / "predictions.csv").is_file() and (tmp_path / "sheet.png").is_file()
    assert (tmp_path / "runs" / "ft" / "curves.png").is_file()
    assert "# needs: ray" in cannot or (tmp_path / "features-ray" / "mobilenet_v2" / "val.h5").is_file()
    assert "# needs: ray" in cannot or json.loads((tmp_path / "runs/ft-ray/run.json").read_text())["engine"]["name"] \
        == "ray"
    assert "# needs: s3" in cannot or (tmp_path / "s3-data").is_dir()
