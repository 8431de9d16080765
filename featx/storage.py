"""Storage, the ground floor: where bytes live. A location is a local path or a URL (``s3://``, ``http(s)://``, or
any scheme an installed fsspec package knows: ``gs://``, ``az://`` ...). Nothing above this module parses a scheme.

It answers the few questions the rest asks: list a prefix (``listing``), read bytes whole or by range
(``read_bytes``), open for streaming (``open_input``), write a finished file so that it appears whole or not at all
(``write_bytes``, ``put_file``: a rename on disk, one PUT on object storage), test and remove (``exists``,
``remove``), and show a URL without its secrets (``shown``). Credentials stay in fsspec's own configuration: the
standard AWS chain (environment, ``~/.aws`` profiles, ``AWS_ENDPOINT_URL``) and ``configure(storage_options)``; a
failure is one ``StorageError`` line naming the URL and what to do, within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

Location = str | os.PathLike
# s3fs as featx uses it: failing within seconds, not minutes (its client retries connection errors many times by
# default), and one GET per whole file (with max_concurrency > 1 it asks each file's size first: twice the requests).
CLIENT_DEFAULTS = {"s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                            "retries": {"max_attempts": 2, "mode": "standard"}},
                          "max_concurrency": 1}}
CLIENT_RETRIES = 2  # s3fs' own retries of a request, on top of the client's
EXTRAS = {"s3": "'featx[s3]'", "http": "'featx[http]'", "https": "'featx[http]'"}  # what a scheme needs installed
SECRET_QUERY = re.compile(r"(signature|credential|token|secret|password|key|sig)$", re.IGNORECASE)
_options: dict = {}


class StorageError(OSError):
    """Object storage refused or could not be reached: one line naming the URL and what to do."""


class StorageUnavailable(StorageError):
    """No request can succeed until the user acts (server unreachable, credentials, access, bucket): a run stops,
    where a single missing object would only be recorded as failed."""


def configure(storage_options: dict | str | None) -> None:
    """fsspec options for every URL this process opens (a dict, or its JSON: ``{"s3": {"anon": true}}`` per
    protocol, or options for every protocol); ``FEATX_STORAGE_OPTIONS`` holds the same JSON."""
    global _options
    _options = _parsed(storage_options, "--storage_options")


def _parsed(options: dict | str | None, what: str) -> dict:
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            raise ValueError(f"{what} must be JSON, e.g. '{{\"s3\": {{\"anon\": true}}}}'") from None
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(options).__name__}")
    return dict(options or {})


def is_url(location: Location) -> bool:
    """Whether ``location`` is a URL (a local path otherwise; ``file://`` counts as local)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def location(path: Location) -> Location:
    """A path the user gave, as featx handles it: a Path on disk, the URL string otherwise."""
    return os.fspath(path) if is_url(path) else Path(path)


def local_path(location: Location) -> Path:
    """A local location as a Path (``file://`` removed)."""
    return Path(os.fspath(location).removeprefix("file://"))


def join(base: Location, *names: str) -> Location:
    """``base / names``: a Path on disk, a URL otherwise; a name that is itself a URL or absolute stays as it is."""
    if names and is_url(names[-1]):
        return names[-1]
    if not is_url(base):
        return local_path(base).joinpath(*names)
    return "/".join([os.fspath(base).rstrip("/"), *(n.strip("/") for n in names if n)])


def name(location: Location) -> str:
    """The last part of a location (a file or folder name)."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: Location) -> Location:
    """The folder holding ``location``."""
    return local_path(location).parent if not is_url(location) else os.fspath(location).rstrip("/").rsplit("/", 1)[0]


def shown(location: Location) -> str:
    """A location as it may be printed or recorded: a URL without user info and without secret query values
    (``https://user:pass@host/x?X-Amz-Signature=...`` -> ``https://host/x?X-Amz-Signature=REDACTED``)."""
    text = os.fspath(location)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{k}=REDACTED" if sep and SECRET_QUERY.search(k) else f"{k}{sep}{v}"
                     for k, sep, v in (q.partition("=") for q in parts.query.split("&") if q))
    return urlunsplit((parts.scheme, host, parts.path, query, parts.fragment))


def absolute(location: Location) -> str:
    """A location as recorded in provenance: an absolute local path, or the URL shown without secrets."""
    return shown(location) if is_url(location) else str(local_path(location).resolve())


def filesystem(url: str):
    """(fsspec filesystem, path in it) for ``url``, with featx's client defaults and the configured options."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options = {**CLIENT_DEFAULTS.get(protocol, {}), **_all_options().get(protocol, {}),
               **{k: v for k, v in _all_options().items() if not isinstance(v, dict)}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        extra = EXTRAS.get(protocol, "the fsspec package it names")
        raise StorageError(f"{shown(url)}: {protocol}:// needs a package not installed here ({error}): pip install "
                           f"{extra}") from None
    except ValueError as error:
        raise StorageError(f"{shown(url)}: {error}") from None
    if hasattr(fs, "retries"):
        fs.retries = CLIENT_RETRIES
    return fs, path


def _all_options() -> dict:
    return _options or _parsed(os.environ.get("FEATX_STORAGE_OPTIONS"), "FEATX_STORAGE_OPTIONS")


@contextlib.contextmanager
def errors(location: Location, doing: str = "reading"):
    """Turn what an object store raises into one ``StorageError`` line naming ``location`` and what to do."""
    if not is_url(location):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - every client error becomes one line; none is lost
        raise storage_error(location, error, doing) from None


MISSING = "(it may have been deleted or moved)"


def storage_error(location: Location, error: BaseException, doing: str) -> StorageError:
    """``error`` as one line naming ``location``: a ``StorageError`` for a missing object, else
    ``StorageUnavailable``."""
    message = f"{shown(location)}: {explain(error, doing)}"
    return (StorageError if message.endswith(MISSING) else StorageUnavailable)(message)


def explain(error: BaseException, doing: str) -> str:
    """What went wrong while ``doing`` something on object storage, and what to do, in words."""
    text = " ".join(str(error).split())
    kind = type(error).__name__
    if kind == "NoCredentialsError" or "Unable to locate credentials" in text:
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or pass "
                "--storage_options '{\"s3\": {\"anon\": true}}' for a public bucket")
    if kind == "ProfileNotFound":
        return f"{text}: name a profile in ~/.aws/config (AWS_PROFILE), or unset AWS_PROFILE"
    if "bucket does not exist" in text or "NoSuchBucket" in text:
        return "the bucket does not exist: create it, or check the name and AWS_ENDPOINT_URL"
    if isinstance(error, PermissionError) or any(s in text for s in ("AccessDenied", "Access Denied", "Forbidden",
                                                                      "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return (f"access denied while {doing} ({_first_clause(text)}): check the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_PROFILE) and that they may do this")
    if isinstance(error, FileNotFoundError) or "404" in text or "NoSuchKey" in text:
        return f"not found while {doing} {MISSING}"
    if any(s in text for s in ("Could not connect", "Cannot connect", "Connection refused", "connect timeout",
                               "Connect timeout", "Name or service not known", "EndpointConnectionError")) \
            or kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"):
        return ("the server cannot be reached: check AWS_ENDPOINT_URL (or the URL's host) and the network; "
                "rerun to resume")
    return f"{kind} while {doing}: {_first_clause(text)}"


def _first_clause(text: str) -> str:
    return text.split(" (", 1)[0][:200] if text else "no detail"


def listing(prefix: Location) -> dict[str, int]:
    """Every file under ``prefix`` (recursively), as {path relative to it: size}, from one listing; empty when
    there is none."""
    if not is_url(prefix):
        root = local_path(prefix)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    fs, path = filesystem(os.fspath(prefix))
    with errors(prefix, "listing"):
        fs.invalidate_cache(path)
        found = fs.find(path, detail=True)
    base = path.rstrip("/") + "/"
    return {key[len(base):]: int(info.get("size") or 0) for key, info in sorted(found.items())
            if key.startswith(base) and info.get("type", "file") == "file"}


def names(folder: Location, pattern: str = "*") -> list[str]:
    """Names of the files directly in ``folder`` matching ``pattern``, sorted; empty when it does not exist."""
    if not is_url(folder):
        folder = local_path(folder)
        return sorted(p.name for p in folder.glob(pattern) if p.is_file()) if folder.is_dir() else []
    return sorted(key for key in listing(folder) if "/" not in key and fnmatch(key, pattern))


def glob(pattern: str) -> list[str]:
    """URLs matching a glob pattern, sorted."""
    fs, path = filesystem(pattern)
    with errors(pattern, "listing"):
        found = fs.glob(path)
    protocol = pattern.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" if "://" not in p else p for p in found)


def exists(location: Location) -> bool:
    """Whether a file or a folder (on object storage: a prefix with objects under it) is at ``location``."""
    return _ask(location, "exists")


def is_file(location: Location) -> bool:
    """Whether ``location`` is a file."""
    return _ask(location, "is_file")


def _ask(location: Location, question: str) -> bool:
    if not is_url(location):
        return getattr(local_path(location), question)()
    fs, path = filesystem(os.fspath(location))
    with errors(location, "checking"):
        fs.invalidate_cache(path)
        return fs.isfile(path) if question == "is_file" else fs.exists(path)


def read_bytes(location: Location, start: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a file, or ``size`` of them from ``start``."""
    if not is_url(location):
        with open(local_path(location), "rb") as f:
            return os.pread(f.fileno(), size, start) if start is not None else f.read()
    fs, path = filesystem(os.fspath(location))
    with errors(location):
        if start is None:
            return fs.cat_file(path)
        return fs.cat_file(path, start=start, end=start + size)


def read_many(locations: list[Location]) -> list[bytes | StorageError]:
    """The bytes of many files, fetched concurrently (on object storage: all requests in flight at once, from one
    event loop); a file that is not there gives its ``StorageError`` in its place. A store that cannot be reached
    raises ``StorageUnavailable``."""
    if not locations or not is_url(locations[0]):
        return [_read_or_error(location) for location in locations]
    fs, _ = filesystem(os.fspath(locations[0]))
    paths = [filesystem(os.fspath(location))[1] for location in locations]
    with errors(locations[0]):
        found = fs.cat(paths, on_error="return")
    results = []
    for location, path in zip(locations, paths):
        value = found.get(path, FileNotFoundError(path))
        if isinstance(value, Exception):
            value = storage_error(location, value, "reading")
            if isinstance(value, StorageUnavailable):
                raise value
        results.append(value)
    return results


def _read_or_error(location: Location) -> bytes | StorageError:
    try:
        return read_bytes(location)
    except OSError as error:
        return StorageError(f"{shown(location)}: {error}")


def open_input(location: Location, block_size: int | None = None):
    """A binary file object to stream ``location`` from (ranged reads on object storage)."""
    if not is_url(location):
        return open(local_path(location), "rb")
    fs, path = filesystem(os.fspath(location))
    with errors(location):
        return fs.open(path, "rb", **({"block_size": block_size} if block_size else {}))


def write_bytes(location: Location, data: bytes | memoryview) -> None:
    """Write a finished file so that it appears whole or not at all: on disk a ``.tmp`` file made durable and
    renamed; on object storage one PUT (an object is visible only once its upload completes)."""
    if is_url(location):
        fs, path = filesystem(os.fspath(location))
        with errors(location, "writing"):
            fs.pipe_file(path, bytes(data))
        return
    path = local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def put_file(local: Path, location: Location) -> None:
    """Give the closed local file ``local`` its final place ``location`` whole: a rename on disk (it is moved), an
    upload on object storage (a multipart upload completes last, so a cut upload leaves no object)."""
    if not is_url(location):
        commit_file(local, local_path(location))
        return
    fs, path = filesystem(os.fspath(location))
    with errors(location, "writing"):
        fs.put_file(os.fspath(local), path)


def put_tree(local: Path, location: Location) -> None:
    """Upload every file under the local folder ``local`` to the folder ``location`` (each appears whole)."""
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        put_file(file, join(location, *file.relative_to(local).parts))


def remove(location: Location) -> None:
    """Delete a file or a folder with everything in it; nothing there is not an error."""
    if not is_url(location):
        path = local_path(location)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = filesystem(os.fspath(location))
    with errors(location, "deleting"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        with contextlib.suppress(FileNotFoundError):  # a folder's own marker, on stores that keep one (SeaweedFS)
            fs.rm_file(path)
        fs.invalidate_cache(path)


def commit_file(tmp: Path, path: Path) -> None:
    """Make a closed local file (or a folder of files) durable, then atomically give it its final name."""
    for file in sorted(tmp.iterdir()) if tmp.is_dir() else [tmp]:
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def local_output(location: Location):
    """A local folder to write an output folder into: ``location`` itself on disk; on object storage a private
    scratch folder, uploaded file by file when the block ends without error."""
    if not is_url(location):
        yield local_path(location)
        return
    with tempfile.TemporaryDirectory(prefix="featx-upload-") as scratch:
        yield Path(scratch)
        put_tree(Path(scratch), location)

