"""A real S3 server for the tests and the object-storage benchmark: SeaweedFS's ``weed server -s3`` on loopback
(run inside a loopback-only namespace: ``tests/isolated.sh``), started and stopped by its own process group."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

S3_ADMIN = ("featxadmin", "featx-admin-secret-0123456789")  # may do anything
S3_READER = ("featxreader", "featx-reader-secret-0123456789")  # may read and list only


class S3Server:
    """A real S3 server (SeaweedFS's ``weed server -s3``) on loopback, its data in ``folder``: two identities
    (``S3_ADMIN``, ``S3_READER``), anonymous access refused. Stopped by its own process group; ``start`` again on the
    same folder and ports brings back what it held."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ports = [_free_with_grpc() for _ in range(4)]  # s3, master, volume, filer
        self.endpoint = f"http://127.0.0.1:{self.ports[0]}"
        self.process: subprocess.Popen | None = None
        (folder / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": S3_ADMIN[0], "secretKey": S3_ADMIN[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": S3_READER[0], "secretKey": S3_READER[1]}],
             "actions": ["Read", "List"]}]}
        (folder / "s3.json").write_text(json.dumps(config))

    def env(self, keys: tuple[str, str] = S3_ADMIN) -> dict[str, str]:
        """The environment a client needs to reach this server as ``keys`` (no ~/.aws files read)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1],
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        s3, master, volume, filer = self.ports
        weed = str(Path(sys.executable).with_name("weed"))
        with open(self.folder / "weed.log", "a") as log:
            self.process = subprocess.Popen(
                [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.folder / 'data'}", "-s3",
                 f"-s3.port={s3}", f"-s3.config={self.folder / 's3.json'}", f"-master.port={master}",
                 f"-volume.port={volume}", f"-filer.port={filer}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 "-master.telemetry=false", "-master.volumeSizeLimitMB=32",
                 "-volume.max=400"],  # a bucket is a collection with volumes of its own: room for many
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", s3), timeout=1):
                break
            time.sleep(0.1)
        assert self.process.poll() is None, (self.folder / "weed.log").read_text()[-2000:]
        self._client_until_ready()

    def _client_until_ready(self) -> None:
        """Wait until a bucket can be made and written (the volume server registers a moment after the port opens)."""
        fs = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.pipe_file("featx-ready/probe", b"ok")
                return
            except Exception:  # noqa: BLE001 - not ready yet
                if time.monotonic() > deadline:
                    raise
                with contextlib.suppress(Exception):
                    fs.mkdir("featx-ready")
                time.sleep(0.3)

    def client(self, keys: tuple[str, str] = S3_ADMIN):
        """An s3fs client of this server (a fresh instance: no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(key=keys[0], secret=keys[1], endpoint_url=self.endpoint, skip_instance_cache=True)

    def bucket(self, name: str) -> str:
        """A new empty bucket; returns ``s3://name``."""
        self.client().mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _free_with_grpc() -> int:
    """A free port below 55536 whose SeaweedFS gRPC twin (port + 10000) is free too."""
    while True:
        port = random.randrange(20000, 55000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
            return port
        except OSError:
            continue

