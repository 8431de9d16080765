"""The README's main command: `make demo` runs ``jobs/hymenoptera.py``, which must pass with the mirror and print
each head's held-out accuracy on the real ants/bees photos (the figures its heads' own reports hold)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO
from test_heads import README_LOGREG, THRESHOLDS


@pytest.mark.real_data
def test_the_demo_passes_and_prints_each_heads_held_out_accuracy(mirror, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "hymenoptera.py"), "--mirror", str(mirror)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val accuracy (153 images, never seen in fitting or selection):" in result.stdout
    printed = {head: float(value) for head, value in re.findall(r"^  (\w+)\s+(\d\.\d{4})$", result.stdout, re.M)}
    assert set(printed) == set(THRESHOLDS), result.stdout
    for head, accuracy in printed.items():
        report = json.loads((tmp_path / "heads" / "mobilenet_v2" / head / "eval-val" / "metrics.json").read_text())
        assert report["held_out"] and report["num_examples"] == 153
        assert accuracy == round(report["accuracy"], 4) and accuracy >= THRESHOLDS[head], (head, accuracy)
    assert printed["logreg"] == pytest.approx(README_LOGREG, abs=1e-4)
    assert (tmp_path / "features" / "mobilenet_v2" / "val.h5").is_file() and not (tmp_path / "data").exists()
