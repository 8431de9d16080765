"""Object storage against a real S3 server (SeaweedFS, started by the session's ``s3`` fixture) and a real HTTP
server on loopback: every source at a URL, features written to and read from S3, resume after kill -9 and after
the server goes away, one-line errors, and no secret in anything featx writes or prints."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, S3_ADMIN, S3_READER, make_image_folder, sigkill_when
from featx import store
from test_faults import SMALL, cli, one_line_error

SMALL_S3 = [*SMALL, "--batch_size", "4"]


def upload(s3, folder: Path, url: str) -> str:
    """Put every file under ``folder`` at ``url`` (s3://bucket/prefix); returns the URL."""
    fs = s3.client()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        fs.put_file(str(file), f"{url.removeprefix('s3://')}/{file.relative_to(folder).as_posix()}")
    return url


def same_features(a, b, tol: float = 1e-5) -> None:
    """Two features files hold the same rows: paths, labels, hashes and features (within ``tol``)."""
    first, second = store.load(a), store.load(b)
    assert first.paths == second.paths and len(first.paths)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.content_hash, second.content_hash)
    np.testing.assert_allclose(first.features, second.features, atol=tol, rtol=0)
    assert first.class_names == second.class_names


def featx(*argv, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The featx command in a child process (its own S3 client and credentials; ``env`` values of None unset)."""
    environment = {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "featx", *map(str, argv)], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("photos") / "data", per_class=6)


def test_image_folder_on_s3_equals_local_and_every_command_reads_it(s3, photos, tmp_path):
    bucket = s3.bucket("folders")
    data = upload(s3, photos, f"{bucket}/photos")
    status, out, err = cli("extract", photos, "--out", tmp_path / "local", *SMALL_S3)
    assert status == 0, err
    status, out, err = cli("extract", data, "--out", f"{bucket}/features", *SMALL_S3, "--shard_size", "4")
    assert status == 0, err
    local, remote = tmp_path / "local/resnet18", f"{bucket}/features/resnet18"
    for split in ("train", "val"):
        same_features(local / f"{split}.h5", f"{remote}/{split}.h5")
    keys = sorted(s3.client().find("folders/features"))
    assert keys == ["folders/features/resnet18/train.h5", "folders/features/resnet18/val.h5"]  # parts removed
    assert store.read_meta(f"{remote}/train.h5")["data_root"] == f"{data}"
    status, out, err = cli("extract", data, "--out", f"{bucket}/features", *SMALL_S3)
    assert status == 0 and "up to date" in out, err  # a rerun finds the committed files

    assert cli("info", f"{remote}/train.h5")[0] == 0
    status, out, err = cli("fit-head", f"{remote}/train.h5", "--val", f"{remote}/val.h5", "--head", "knn",
                           "--out", f"{bucket}/heads/knn")
    assert status == 0, err
    head = tmp_path / "knn"
    s3.client().get("folders/heads/knn", str(head), recursive=True)
    assert (head / "head.json").is_file()
    status, out, err = cli("evaluate", head, f"{remote}/val.h5", "--out", f"{bucket}/reports/knn")
    assert status == 0, err
    assert s3.client().isfile("folders/reports/knn/metrics.json")
    status, out, err = cli("predict", head, f"{data}/val", "--out", tmp_path / "predictions.csv")
    assert status == 0, err
    predicted = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in predicted) == [
        f"{data}/{p}" for p in sorted(store.load(local / "val.h5").paths)]  # each image, by its URL
    assert cli("export-features", f"{remote}/val.h5", f"{bucket}/emb.parquet")[0] == 0
    import pyarrow.parquet as pq

    with s3.client().open("folders/emb.parquet") as f:
        table = pq.read_table(f)
    assert table.num_rows == len(store.load(local / "val.h5").paths)


def test_every_source_kind_at_a_url_equals_the_same_files_on_disk(s3, photos, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_labels import tar_writer_shards

    bucket = s3.bucket("sources")
    train = sorted((photos / "train").rglob("*.jpg"))
    # loose images (unlabelled), a CSV manifest of relative paths, a Parquet manifest of full URLs, tar shards
    loose = tmp_path / "loose"
    for i, photo in enumerate(train):
        (loose / f"{i % 2}").mkdir(parents=True, exist_ok=True)
        (loose / f"{i % 2}" / f"img{i}.jpg").write_bytes(photo.read_bytes())
    (loose / "0" / "notes.txt").write_text("not an image")
    upload(s3, loose, f"{bucket}/loose")
    rows = [(p.relative_to(photos).as_posix(), p.parent.name) for p in train]
    (photos / "list.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    upload(s3, photos, f"{bucket}/photos")
    pq.write_table(pa.table({"path": [f"{bucket}/photos/{p}" for p, _ in rows], "label": [c for _, c in rows]}),
                   tmp_path / "urls.parquet")
    s3.client().put_file(str(tmp_path / "urls.parquet"), "sources/tables/urls.parquet")
    tar_writer_shards(tmp_path / "tars", train[:12], lambda i, p: {"cls": str(i % 2)})
    upload(s3, tmp_path / "tars", f"{bucket}/tars")

    cases = {"loose": (f"{bucket}/loose", loose, ["--source", "unlabelled"]),
             "class-folders": (f"{bucket}/loose", loose, []),
             "csv": (f"{bucket}/photos/list.csv", photos / "list.csv", []),
             "parquet-urls": (f"{bucket}/tables/urls.parquet", photos / "list.csv", []),
             "tar-braces": (f"{bucket}/tars/train-{{000000..000001}}.tar", tmp_path / "tars", []),
             "tar-glob": (f"{bucket}/tars/train-*.tar", tmp_path / "tars", []),
             "tar-folder": (f"{bucket}/tars", tmp_path / "tars", [])}
    for name, (url, local, extra) in cases.items():
        outputs = tmp_path / "out" / name
        status, out, err = cli("extract", url, "--out", outputs / "s3", *SMALL_S3, *extra)
        assert status == 0, (name, err)
        status, out, err = cli("extract", local, "--out", outputs / "local", *SMALL_S3, *extra)
        assert status == 0, (name, err)
        split = "train" if name.startswith("tar") else "all"
        s3_file, local_file = outputs / "s3/resnet18" / f"{split}.h5", outputs / "local/resnet18"
        if name == "parquet-urls":  # rows are the full URLs; the features are those of the same files
            first, second = store.load(s3_file), store.load(local_file / f"{split}.h5")
            assert first.paths == [f"{bucket}/photos/{p}" for p, _ in rows] == \
                [f"{bucket}/photos/{p}" for p in second.paths]
            np.testing.assert_allclose(first.features, second.features, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(first.content_hash, second.content_hash)
            continue
        same_features(s3_file, local_file / f"{split}.h5")


class RangeRequests(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` (as object stores and web servers do)."""

    def send_head(self):
        spec = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not spec.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start, _, end = spec[6:].partition("-")
        start, end = int(start or 0), min(int(end) if end else size - 1, size - 1)
        data = path.read_bytes()[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        import io

        return io.BytesIO(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeRequests, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_http_tar_and_a_manifest_of_http_images(http_server, photos, tmp_path):
    from test_labels import tar_writer_shards

    www, base = http_server
    train = sorted((photos / "train").rglob("*.jpg"))
    tar_writer_shards(www, train[:12], lambda i, p: {"cls": str(i % 2)})
    status, out, err = cli("extract", f"{base}/train-{{000000..000001}}.tar", "--out", tmp_path / "http", *SMALL_S3)
    assert status == 0, err
    status, out, err = cli("extract", www, "--out", tmp_path / "disk", *SMALL_S3)
    assert status == 0, err
    same_features(tmp_path / "http/resnet18/train.h5", tmp_path / "disk/resnet18/train.h5")

    for photo in train:
        (www / photo.name).write_bytes(photo.read_bytes())
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"{base}/{p.name},{p.parent.name}\n" for p in train))
    status, out, err = cli("extract", manifest, "--out", tmp_path / "urls", *SMALL_S3)
    assert status == 0, err
    features = store.load(tmp_path / "urls/resnet18/all.h5")
    assert features.paths == [f"{base}/{p.name}" for p in train] and not features.failed


def _extract_command(data, out, shard_size: int = 4) -> list[str]:
    return [sys.executable, "-m", "featx", "extract", str(data), "--out", str(out), *SMALL, "--shard_size",
            str(shard_size), "--batch_size", "2"]


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """Enough images (50 shards of 4) that a run can be stopped between its shards."""
    return make_image_folder(tmp_path_factory.mktemp("many") / "data", splits=("train",), per_class=100, size=(64, 64))


def _committed(s3, prefix: str, client=None) -> list[str]:
    client = client or s3.client()
    client.invalidate_cache()
    return sorted(k for k in client.find(prefix) if k.rsplit("/", 1)[-1].startswith("part-"))


def test_kill_9_during_an_s3_extract_then_rerun_equals_a_clean_run(s3, many_photos, tmp_path):
    bucket = s3.bucket("killed")
    data = upload(s3, many_photos, f"{bucket}/data")
    clean = subprocess.run(_extract_command(data, f"{bucket}/clean"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    parts, client = "killed/f/resnet18/train.h5.parts", s3.client()  # one client: each poll one quick LIST
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(_extract_command(data, f"{bucket}/f"), stdout=log, stderr=log)
        sigkill_when(process, lambda: len(_committed(s3, parts, client)) >= 2)
    left = _committed(s3, parts)
    assert 2 <= len(left) < 50, (left, (tmp_path / "killed.log").read_text()[-2000:])  # stopped between shards
    for key in left:  # every object listed is a whole shard
        with store.open_h5(f"s3://{key}") as f:
            assert f["features"].shape[0] == f["items"].shape[0] == 4
    rerun = subprocess.run(_extract_command(data, f"{bucket}/f"), capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout, rerun.stderr[-2000:]
    same_features(f"{bucket}/f/resnet18/train.h5", f"{bucket}/clean/resnet18/train.h5", tol=0)
    assert len(set(store.load(f"{bucket}/f/resnet18/train.h5").paths)) == 200  # no duplicate rows
    assert not s3.client().exists(parts)


def test_the_server_going_away_is_one_line_and_the_rerun_resumes(s3, many_photos, tmp_path):
    bucket = s3.bucket("outage")
    data = upload(s3, many_photos, f"{bucket}/data")
    clean = subprocess.run(_extract_command(data, tmp_path / "clean"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    process = subprocess.Popen(_extract_command(data, f"{bucket}/f", shard_size=2), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # 100 shards: the server goes away among them
    parts, client = "outage/f/resnet18/train.h5.parts", s3.client()
    deadline = time.monotonic() + 120
    while len(_committed(s3, parts, client)) < 1 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    s3.stop()
    stopped = time.monotonic()
    try:
        out, err = process.communicate(timeout=60)
        assert time.monotonic() - stopped < 30  # seconds, not minutes of retries
    finally:
        s3.start()
    if process.returncode == 0:
        pytest.fail("the run finished before the server went away; make the data larger")
    one_line_error(process.returncode, err, "cannot be reached")
    rerun = subprocess.run(_extract_command(data, f"{bucket}/f", shard_size=2), capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout, rerun.stderr[-2000:]
    resumed = store.load(f"{bucket}/f/resnet18/train.h5")
    assert not resumed.failed  # nothing recorded as failed while the server was away
    same_features(f"{bucket}/f/resnet18/train.h5", tmp_path / "clean/resnet18/train.h5")


def without_credentials() -> dict:
    """An environment with no AWS credentials at all (the variables unset, no ~/.aws files)."""
    return dict.fromkeys(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"))


def test_every_bad_url_or_credential_is_one_line_within_seconds(s3, photos, tmp_path):
    from conftest import free_port

    bucket = s3.bucket("errors")
    data = upload(s3, photos, f"{bucket}/photos")
    cases = [
        ("missing bucket", ["extract", "s3://no-such-bucket/photos", *SMALL], {}, "bucket does not exist"),
        ("no credentials", ["extract", data, "--out", tmp_path / "f", *SMALL], without_credentials(),
         "no credentials"),
        ("wrong secret", ["extract", data, "--out", tmp_path / "f", *SMALL],
         {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "access denied"),
        ("read-only keys writing", ["extract", data, "--out", f"{bucket}/features", *SMALL],
         dict(zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), S3_READER)), "access denied"),
        ("unreachable endpoint", ["extract", data, "--out", tmp_path / "f", *SMALL],
         {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "cannot be reached"),
        ("missing features", ["info", f"{bucket}/features/resnet18/train.h5"], {}, "does not exist"),
        ("virtual layout on S3", ["extract", data, "--out", f"{bucket}/features", "--layout", "virtual", *SMALL], {},
         "--layout virtual"),
        ("storage options not JSON", ["info", f"{bucket}/x.h5", "--storage_options", "{key: 1}"], {}, "JSON"),
    ]
    for name, argv, env, fragment in cases:
        start = time.monotonic()
        result = featx(*argv, env=env)
        assert time.monotonic() - start < 30, name  # seconds, not minutes of retries
        one_line_error(result.returncode, result.stderr, fragment)
        assert not (tmp_path / "f").exists(), name  # nothing written
    assert not s3.client().find("errors/features")  # the read-only keys wrote nothing either


def test_an_object_listed_but_gone_is_recorded_as_failed_and_the_rest_extracted(s3, photos, tmp_path):
    bucket = s3.bucket("vanished")
    data = upload(s3, photos, f"{bucket}/photos")
    s3.client().rm_file("vanished/photos/train/cats/cats_002.jpg")  # gone after the manifest listed it
    names = sorted(p.relative_to(photos).as_posix() for p in (photos / "train").rglob("*.jpg"))
    s3.client().pipe_file("vanished/photos/list.csv", ("path\n" + "\n".join(names) + "\n").encode())
    status, out, err = cli("extract", f"{data}/list.csv", "--out", tmp_path / "f", *SMALL)
    assert status == 0, err
    features = store.load(tmp_path / "f/resnet18/all.h5")
    assert [p for p, _ in features.failed] == ["train/cats/cats_002.jpg"] and "not found" in features.failed[0][1]
    assert len(features.paths) == len(names) - 1


def test_no_secret_reaches_any_output(s3, photos, http_server, tmp_path):
    """Credentials from the environment, from --storage_options, and in a URL's user info: none of them in what
    featx prints, in the features, heads, reports and exports it writes, or in its cache."""
    bucket = s3.bucket("secrets")
    data = upload(s3, photos, f"{bucket}/photos")
    www, base = http_server
    photo = sorted((photos / "val").rglob("*.jpg"))[0]
    (www / "a.jpg").write_bytes(photo.read_bytes())
    user_info_url = base.replace("http://", "http://someone:url-password-4242@") + "/a.jpg?X-Amz-Signature=sig4242"
    (tmp_path / "urls.csv").write_text(f"path\n{user_info_url}\n")
    options = '{"s3": {"key": "%s", "secret": "%s"}}' % S3_ADMIN
    runs = [featx("extract", data, "--out", f"{bucket}/features", *SMALL),
            featx("extract", data, "--out", f"{bucket}/features2", *SMALL, "--storage_options", options,
                  env=without_credentials()),
            featx("fit-head", f"{bucket}/features/resnet18/train.h5", "--head", "logreg", "--out", tmp_path / "head"),
            featx("evaluate", tmp_path / "head", f"{bucket}/features/resnet18/val.h5", "--out", f"{bucket}/report"),
            featx("export-features", f"{bucket}/features/resnet18/val.h5", f"{bucket}/emb.parquet"),
            featx("info", f"{bucket}/features/resnet18/val.h5"),
            featx("extract", tmp_path / "urls.csv", "--out", tmp_path / "url-features", *SMALL),
            featx("info", tmp_path / "url-features/resnet18/all.h5")]
    assert all(run.returncode == 0 for run in runs), [run.stderr[-1000:] for run in runs if run.returncode]
    assert store.load(tmp_path / "url-features/resnet18/all.h5").paths == [
        f"{base}/a.jpg?X-Amz-Signature=REDACTED"]
    s3.client().get("secrets", str(tmp_path / "bucket"), recursive=True)
    written = [p for folder in (tmp_path, Path(os.environ["FEATX_CACHE"])) for p in folder.rglob("*") if p.is_file()]
    secrets = [S3_ADMIN[1].encode(), b"url-password-4242", b"sig4242"]
    for text in [run.stdout + run.stderr for run in runs]:
        assert not any(secret.decode() in text for secret in secrets)
    for file in written:
        if file.name != "urls.csv":  # the user's own input
            assert not any(secret in file.read_bytes() for secret in secrets), file
    assert len(written) > 10


@pytest.mark.ray
@pytest.mark.real_data
def test_ray_workers_read_and_write_s3_themselves_and_match_local(s3, ray_cluster, hymenoptera, hymenoptera_features,
                                                                  mobilenet_weights, tmp_path):
    """The ants/bees set on S3, extracted on the two-node cluster (its nodes started with the S3 credentials in their
    environment) from S3 to S3 with the real MobileNetV2: the local engine's features from local files, and the
    same held-out logreg accuracy."""
    from featx.backbones import BackboneSpec
    from featx.engines import RayOptions
    from featx.extract import extract
    from featx.fit import fit_head
    from featx.options import ExtractOptions

    bucket = s3.bucket("ray")
    data = upload(s3, hymenoptera, f"{bucket}/hymenoptera")
    summaries = extract(data, BackboneSpec("mobilenet_v2", str(mobilenet_weights)), f"{bucket}/features",
                        options=ExtractOptions(batch_size=32, shard_size=64, device="cpu"), engine="ray",
                        ray_options=RayOptions(ray_cluster.address))
    for split in ("train", "val"):
        remote, local = store.load(summaries[split]["path"]), store.load(hymenoptera_features / f"{split}.h5")
        assert remote.paths == local.paths and np.array_equal(remote.labels, local.labels)
        assert np.abs(remote.features - local.features).max() <= 1e-5
        np.testing.assert_array_equal(remote.content_hash, local.content_hash)
    head = fit_head(f"{bucket}/features/mobilenet_v2/train.h5", "auto", "logreg", tmp_path / "head")
    assert head.fitted_on_["val"] == f"{bucket}/features/mobilenet_v2/val.h5"  # val.h5 beside train, on S3
    assert head.selection_["val_accuracy"] == pytest.approx(0.9608, abs=1e-4)


def test_finetune_reads_its_images_from_s3(s3, photos, tmp_path):
    bucket = s3.bucket("finetune")
    data = upload(s3, photos, f"{bucket}/photos")
    from test_lose_nothing import FINETUNE

    status, out, err = cli("finetune", data, *FINETUNE, "--out", tmp_path / "run")
    assert status == 0, err
    record = json.loads((tmp_path / "run/run.json").read_text())
    assert record["data"]["root"] == data
    local = cli("finetune", photos, *FINETUNE, "--out", tmp_path / "local")
    assert local[0] == 0, local[2]
    assert json.loads((tmp_path / "local/run.json").read_text())["data"]["train"] == record["data"]["train"]
    history = [json.loads((tmp_path / name / "history.json").read_text()) for name in ("run", "local")]
    assert history[0][-1]["train_loss"] == pytest.approx(history[1][-1]["train_loss"], rel=1e-5)  # same images


def test_locations_join_and_show_as_a_user_expects():
    from featx import storage

    assert storage.join("s3://b/data/", "train", "a.jpg") == "s3://b/data/train/a.jpg"
    assert storage.join("s3://b/data", "https://h/x.jpg") == "https://h/x.jpg"  # a full URL in a manifest row
    assert storage.join("/data", "train/a.jpg") == Path("/data/train/a.jpg")
    assert storage.parent("s3://b/f/train.h5") == "s3://b/f" and storage.name("s3://b/f/train.h5") == "train.h5"
    assert storage.shown("https://me:pw@h:8/x.jpg?X-Amz-Signature=s&X-Amz-Date=1&token=t&v") == \
        "https://h:8/x.jpg?X-Amz-Signature=REDACTED&X-Amz-Date=1&token=REDACTED&v"
    assert storage.shown("/local/p?x=1") == "/local/p?x=1" and not storage.is_url("file:///tmp/x")
    for bad in ("{x", "[1]"):
        with pytest.raises(ValueError, match="--storage_options must be"):
            storage.configure(bad)
    with pytest.raises(storage.StorageError, match="gs:// needs a package not installed here"):
        storage.filesystem("gs://bucket/x")
