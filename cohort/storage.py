"""Where run directories live: a local path, or a URI on any filesystem pyarrow knows.

    location("runs/dml")              -> pathlib.Path("runs/dml")        (the default)
    location("s3://bucket/runs/dml")  -> RemotePath(S3FileSystem, "bucket/runs/dml")
    location("gs://…"), location("hdfs://…"), ...: whatever pyarrow.fs.FileSystem.from_uri takes

A RemotePath offers the few pathlib methods the project uses (/, name, parent, exists,
is_dir, is_file, iterdir, read_bytes, read_text, mkdir, resolve), so readers work on either.
Writers go through the functions below, which keep local writes atomic (a temporary file
beside the target, then a rename) and write objects whole (an object store has no rename,
but an object appears only once its upload completes). A RemotePath has no __fspath__, so it
can never be mistaken for a local folder named `s3:`.

S3 settings come from the standard AWS environment (AWS_ENDPOINT_URL for MinIO, Ceph or R2,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which pyarrow reads itself.
Nothing here imports Ray.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .errors import UsageError

# "s3://…", "gs://…", "file:///…", and the "s3:/…" a normalised URI turns into: never a local
# path. Schemes have 2 letters or more (a drive letter like "C:/" is not one).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


class RemotePath:
    """A path on a pyarrow filesystem other than the local one (picklable: Ray ships it).
    `prefix` and `query` rebuild its URI: "s3://" + "bucket/key", "hdfs://host:8020" + "/a/b",
    then the URI's options (e.g. "?endpoint_override=…"), kept on every path below it."""

    def __init__(self, fs: pafs.FileSystem, path: str, prefix: str, query: str = ""):
        self.fs, self.path = fs, str(PurePosixPath(path))
        self.prefix, self.query = prefix, query

    def _at(self, path: str) -> "RemotePath":
        return RemotePath(self.fs, path, self.prefix, self.query)

    # ---- pathlib's vocabulary ---------------------------------------------------------------
    def __truediv__(self, name: str) -> "RemotePath":
        return self._at(f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> "RemotePath":
        return self._at(str(PurePosixPath(self.path).parent))

    def resolve(self) -> "RemotePath":
        return self

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def iterdir(self) -> list["RemotePath"]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self._at(info.path) for info in infos]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:   # FileNotFoundError if missing
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do on an object store: a "directory" exists once an object is under it."""

    # ---- identity -----------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.prefix}{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and (self.prefix, self.path) == (other.prefix, other.path)

    def __lt__(self, other: "RemotePath") -> bool:
        return self.path < other.path

    def __hash__(self) -> int:
        return hash((self.prefix, self.path))


Location = Union[Path, RemotePath]


def location(value: Any, flag: str = "--output") -> Location:
    """A Path for a plain path (or file:// URI), a RemotePath for any other URI pyarrow
    understands; an unknown scheme or unusable URI is a UsageError naming `flag`."""
    if isinstance(value, (Path, RemotePath)):
        return value
    text = os.fspath(value)
    scheme = _SCHEME.match(text)
    if scheme is None:
        return Path(text)
    if "://" not in text:
        raise UsageError(flag, f"{text!r} is not a URI (write {scheme.group(1)}://…) nor a path")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as exc:   # ArrowInvalid, ArrowNotImplementedError, OSError, ...
        raise UsageError(flag, f"cannot open {text} ({first_line(exc)})") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    fs = patient_s3(fs)
    parts = urlsplit(text)
    bucket = path.startswith(parts.netloc)   # s3, gs: the path starts with the bucket's name
    if not path.strip("/") or (bucket and "/" not in path.strip("/")):
        raise UsageError(flag, f"{text} needs a folder inside the bucket (e.g. {text.rstrip('/')}/run)")
    prefix = f"{parts.scheme}://" + ("" if bucket else parts.netloc)
    return RemotePath(fs, path.rstrip("/"), prefix, parts.query)


# The AWS SDK's defaults, which pyarrow keeps: a request fails once it has transferred nothing
# for 3 seconds. A busy S3-compatible server (or node) stalls longer than that now and then,
# and a checkpoint that fails to load or save stops a run; these wait longer.
S3_TIMEOUTS = {"connect_timeout": 10.0, "request_timeout": 30.0}


def patient_s3(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3FileSystem like `fs` with the timeouts above where `fs` has the SDK's defaults;
    any other filesystem unchanged. (The URI cannot carry timeouts: pyarrow refuses them
    there. The options come from the filesystem's pickling state; should a pyarrow version
    change it, `fs` is used as it is.)"""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    try:
        options = dict(fs.__reduce__()[1][0])
        for key, seconds in S3_TIMEOUTS.items():
            if options.get(key, -1) < 0:
                options[key] = seconds
        return pafs.S3FileSystem(**options)
    except Exception:  # noqa: BLE001
        return fs


def require_bucket(path: Location, flag: str) -> None:
    """An object store's bucket must exist before a run starts (a write to a missing bucket
    fails only once training has begun); raises UsageError naming `flag`."""
    if not is_remote(path) or path.prefix.count("/") != 2:   # local, or not bucket/key style
        return
    bucket = path.path.split("/", 1)[0]
    if path.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise UsageError(flag, f"bucket {bucket!r} of {path} does not exist (create it first)")


def first_line(exc: Exception) -> str:
    """An exception's first line, capped: what a one-line error quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def is_remote(path: Location) -> bool:
    return isinstance(path, RemotePath)


# ---- writing ------------------------------------------------------------------------------------
def write_bytes(path: Location, data: bytes) -> None:
    """The whole file at once: locally through a temporary file renamed into place."""
    if is_remote(path):
        with path.fs.open_output_stream(path.path) as stream:
            stream.write(data)
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Location, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Location, payload: Any) -> None:
    write_text(location(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_torch(obj, path: Location) -> None:
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(location(path), buffer.getvalue())


def load_torch(path: Location):
    """torch.load(weights_only=True) of a local or remote file, onto the CPU."""
    import torch
    path = location(path)
    source = io.BytesIO(path.read_bytes()) if is_remote(path) else path
    return torch.load(source, map_location="cpu", weights_only=True)


def write_parquet(table, path: Location) -> None:
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(location(path), buffer.getvalue())


def read_parquet(path: Location):
    import pyarrow.parquet as pq
    path = location(path)
    if is_remote(path):
        return pq.read_table(path.path, filesystem=path.fs)
    return pq.read_table(path)


def remove(path: Location) -> None:
    """Delete a file or a whole directory tree; nothing if it does not exist."""
    if is_remote(path):
        kind = path._type()
        if kind == pafs.FileType.Directory:
            path.fs.delete_dir(path.path)
        elif kind == pafs.FileType.File:
            path.fs.delete_file(path.path)
        return
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def upload_folder(local: Path, target: RemotePath) -> None:
    """Copy every file of a local folder (flat) to `target`, replacing objects of the same name."""
    for file in sorted(Path(local).iterdir()):
        if file.is_file():
            write_bytes(target / file.name, file.read_bytes())


def ray_storage(path: Location) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig and Checkpoint."""
    if is_remote(path):
        return path.path, path.fs
    return str(Path(path).resolve()), None
