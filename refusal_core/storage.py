"""Where the warehouse lives: a local folder or an object-store URL (s3://, gs://, az://), through fsspec.

Every file of the warehouse is written whole or not at all: locally through a temporary file
in the same folder and a rename, on an object store as one upload, which only becomes visible
once complete. A reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from upath import UPath

Location = Path | UPath
"""A local path, or a UPath for a URL."""


def location(text: str | os.PathLike) -> Location:
    """A local `Path` (for a path or a file:// URL), or a `UPath` for a URL such as s3://bucket/prefix.

    The store's cached listings are dropped, so that what other machines wrote since is seen.
    """
    if "://" not in str(text):
        return Path(text)
    path = UPath(str(text))
    if path.protocol in ("file", "local"):
        return Path(path.path)
    try:
        path.fs.invalidate_cache()
    except ImportError as error:
        raise ValueError(f"The warehouse {text} needs an fsspec filesystem for {path.protocol}:// "
                         f"({error}); for s3:// install it with pip install -e '.[s3]'.") from None
    return path


def uri(path: Location) -> str:
    """`path` as a URL without a trailing slash (s3://bucket/prefix), or a local path as file://."""
    return f"{path.protocol}://{path.path.rstrip('/')}" if is_remote(path) else path.resolve().as_uri()


def shown(path: Location) -> str:
    """`path` as people type it: the URL on an object store (s3://bucket, no trailing slash), else the path."""
    return uri(path) if is_remote(path) else str(path)


def scratch_dir() -> Path:
    """A local folder for files on their way to an object store (under $TMPDIR, else the system's)."""
    folder = Path(tempfile.gettempdir()) / "refusal-sae"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def is_remote(path: Location) -> bool:
    """Whether `path` is on an object store (or any fsspec filesystem) rather than a local folder."""
    return not isinstance(path, Path)


def write_atomically(path: Location, write: Callable[[Path], None]) -> Location:
    """Call `write` on a local temporary file, then publish it at `path` in one step (rename or upload)."""
    if is_remote(path):
        temporary = owned_temporary(scratch_dir(), "upload", path.suffix)
        try:
            write(temporary)
            path.fs.put_file(str(temporary), path.path)
        finally:
            temporary.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = owned_temporary(path.parent, f".{path.name}", ".tmp")
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates files readable by their owner only.
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def owned_temporary(directory: Path, prefix: str, suffix: str) -> Path:
    """A new empty file `<prefix>~<host>~<pid>~<random><suffix>` in `directory`, after deleting the ones
    of that name that a killed process of this machine left behind."""
    host = socket.gethostname()
    for leftover in directory.glob(f"{prefix}~*{suffix}"):
        parts = leftover.name.removeprefix(prefix).split("~")
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not process_alive(int(parts[2])):
            leftover.unlink(missing_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{prefix}~{host}~{os.getpid()}~", suffix=suffix, dir=directory)
    os.close(handle)
    return Path(name)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(root: Location) -> None:
    """Raise a one-line error unless a file can be written under `root` (a missing bucket, no credentials)."""
    probe = root / f".write-check~{socket.gethostname()}~{os.getpid()}"
    try:
        write_atomically(probe, lambda temporary: temporary.write_bytes(b""))
    except Exception as error:  # noqa: BLE001 - every store reports these differently.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"Cannot write to the warehouse {shown(root)} ({reason}); create it or point "
                         "REFUSAL_SAE_WAREHOUSE at a folder or bucket you can write to.") from None
    try:
        probe.unlink()
    except Exception:  # noqa: BLE001 - a store that allows writes but not deletes still takes the tables.
        pass


def check_readable(root: Location) -> None:
    """Raise a one-line error if an object-store warehouse cannot be listed (a missing bucket, no credentials)."""
    if not is_remote(root):
        return  # a missing local folder is an empty warehouse
    try:
        root.fs.ls(root.path)
        return
    except FileNotFoundError as error:
        bucket = root.path.split("/")[0]
        if root.fs.exists(bucket):
            return  # nothing written under this prefix yet: an empty warehouse
        reason = " ".join(str(error).split()) or f"no bucket {bucket}"
    except Exception as error:  # noqa: BLE001 - every store reports these differently.
        reason = " ".join(str(error).split()) or type(error).__name__
    raise ValueError(f"Cannot read the warehouse {shown(root)} ({reason}); check the bucket name in "
                     "REFUSAL_SAE_WAREHOUSE and the store's credentials.")


def arrow_source(path: Location) -> tuple[str, object | None]:
    """What pyarrow reads `path` from: (file name, None) locally, (path in the store, fsspec filesystem) remotely."""
    return (path.path, path.fs) if is_remote(path) else (str(path), None)
