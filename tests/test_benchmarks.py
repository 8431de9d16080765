"""Every benchmark runs end to end on a tiny set (a smoke run: nothing here is timed or compared) and writes its
results where ``--out`` says, with the machine it ran on; the committed results are never touched."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, make_image_folder, missing, ray_problem, s3_problem

BENCHMARKS = {  # script -> tiny arguments (DATA is the tiny folder)
    "bench_extract": ["--data", "DATA", "--backbones", "resnet18", "--repeats", "1", "--batch_size", "8",
                      "--runtimes"],
    "bench_families": ["--data", "DATA", "--backbones", "resnet18", "--repeats", "1"],
    "bench_finetune": ["--data", "DATA", "--backbones", "resnet18", "--repeats", "1", "--batch_size", "8"],
    "bench_objstore": ["--data", "DATA", "--backbone", "resnet18", "--weights", "none", "--repeats", "1",
                       "--list_objects", "300"],
    "bench_compare": ["--data", "DATA", "--backbones", "resnet18=none", "--shots", "1,all", "--repeats", "1",
                      "--draws", "2"],
    "bench_heads": ["--rows", "2000", "--dims", "64", "--dtypes", "float32", "--logreg_max_rows", "2000"],
    "bench_export": ["--rows", "2000", "--dim", "64"],
    "bench_scale": ["--data", "DATA", "--copies", "1", "--backbone", "resnet18", "--merge_rows", "20000",
                    "--merge_dim", "16"],
    "ceilings": ["--backbones", "squeezenet1_1", "--batch_size", "4", "--train_batch_size", "4"],
    "time_to_accuracy": ["--data", "DATA", "--epochs", "1"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("bench") / "data", per_class=8, size=(96, 80))


def test_every_benchmark_is_smoke_tested():
    assert set(BENCHMARKS) == {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"common"}


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_on_a_tiny_set(name, tiny, mirror, tmp_path):
    if name == "bench_scale" and ray_problem():  # it times the Ray engine too
        missing(ray_problem(), "FEATX_REQUIRE_RAY")
    if name == "bench_objstore" and s3_problem():  # it starts an S3 server
        missing(s3_problem(), "FEATX_REQUIRE_S3")
    committed = {p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()}
    argv = [str(tiny) if arg == "DATA" else arg for arg in BENCHMARKS[name]]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *argv, "--out", str(tmp_path),
                             "--mirror", str(mirror)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["benchmark"] == name and record["machine"]["cores"] >= 1
    assert (tmp_path / f"{name}.md").read_text().count("|") > 4
    assert {p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()} == committed
