"""Checkpoints of long steps: every finished unit of work (a batch) kept on disk, so a killed step resumes after it.

A step's checkpoints live in one folder named by a hash of everything that determines the step's output
(its code version, model, inputs and settings), so a checkpoint of other inputs or other code is never
read back. Each unit is one file, named by a hash of the unit's own identity (its prompts, the
intervention), written whole or not at all (a temporary file and a rename): an Arrow IPC file for a
table, a safetensors file for tensors. Nothing is pickled. A step that completes deletes its folder.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from safetensors.torch import load_file, save_file

from refusal_core.parquet import to_json
from refusal_core.storage import write_atomically

Result = pa.Table | dict[str, torch.Tensor]
"""What a unit of work produces: a table, or named tensors."""

SUFFIXES = {pa.Table: ".arrow", dict: ".safetensors"}


@dataclass(frozen=True)
class Checkpoints:
    """Where one step keeps its finished units; `Checkpoints()` (no folder) keeps nothing and computes everything."""

    folder: Path | None = None
    log: Callable[[str], None] = field(default=print, compare=False)
    scope: tuple[Mapping[str, object], ...] = ()
    """Identity shared by the units of a part of the step (an intervention, the settings of a pass)."""
    root: Path | None = None
    """The folder that holds every step's checkpoints: `clear` also deletes the empty folders up to it, itself included."""

    def within(self, **identity: object) -> Checkpoints:
        """The same folder, for units that are also identified by `identity` (say, the intervention they run under)."""
        return replace(self, scope=(*self.scope, identity))

    def resume(self, what: str, units: Sequence[object], compute: Callable[[list[int]], Iterable[Result]]) -> Iterator[Result]:
        """Yield each unit's result in order: read back when a run finished it before, else computed and saved.

        `units` are the units' identities (JSON-able: their prompts, say); `compute(todo)` gets the positions
        of the unfinished ones, in order, and yields their results in that order, so a loop that sets up
        shared state (a prefix cache) does it once. Each result is saved as soon as it is yielded.
        """
        paths = [self._path(what, unit) for unit in units]
        finished = {i for i, path in enumerate(paths) if path is not None and _saved(path) is not None}
        todo = [i for i in range(len(units)) if i not in finished]
        if finished:
            self.log(f"{what}: {len(finished)} of {len(units)} batches were finished by an earlier run and are read back "
                     f"from {self.folder}; computing the other {len(todo)}.")
        computed = iter(compute(todo)) if todo else iter(())
        try:
            for i, path in enumerate(paths):
                if i in finished:
                    yield _load(_saved(path))
                    continue
                result = next(computed, None)
                if result is None:
                    raise RuntimeError(f"{what}: the computation ended before its {len(todo)} unfinished batches did.")
                if path is not None:
                    self.save(path, result)
                yield result
        finally:
            close = getattr(computed, "close", None)
            if close is not None:  # a generator's `with` blocks (hooks on the model) end here, also after an error
                close()

    def save(self, path: Path, result: Result) -> None:
        """Write one unit's result to `path` (suffix added by its kind), atomically."""
        if isinstance(result, pa.Table):
            def write(temporary: Path) -> None:
                with pa.OSFile(str(temporary), "wb") as sink, ipc.new_file(sink, result.schema) as writer:
                    writer.write_table(result)
        elif isinstance(result, dict):
            def write(temporary: Path) -> None:
                save_file({name: tensor.detach().cpu().contiguous() for name, tensor in result.items()}, str(temporary))
        else:
            raise TypeError(f"A checkpointed unit is a pyarrow Table or a dict of tensors, not {type(result).__name__}.")
        write_atomically(path.with_suffix(SUFFIXES[type(result)]), write)

    def clear(self) -> None:
        """Delete the step's checkpoints (its output is complete), and the folders above them that are left empty."""
        if self.folder is None:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root is None or self.root not in self.folder.parents:
            return
        for parent in self.folder.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty: another step's checkpoints
                break
            if parent == self.root:
                break

    def _path(self, what: str, unit: object) -> Path | None:
        """Where a unit's result goes, without its suffix: a hash of the scope, `what` and the unit's identity."""
        if self.folder is None:
            return None
        return self.folder / digest({"scope": list(self.scope), "what": what, "unit": unit})[:40]


def step_checkpoints(root: Path, step: Sequence[str], identity: Mapping[str, object],
                     log: Callable[[str], None] = print) -> Checkpoints:
    """The checkpoints of one step (an asset's partition, say) in `root`/<step...>/<sha256 of `identity`>.

    `identity` is everything that determines the step's output: code version, model weights, dtype and
    device, the content hashes of its inputs, its settings. The folders of the same step under another
    identity, left by a killed run whose inputs, settings or code have changed since, are deleted.
    """
    base = root.joinpath(*step)
    key = digest(dict(identity))[:32]
    if base.is_dir():
        for other in base.iterdir():
            if other.name != key and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
    return Checkpoints(base / key, log, root=root)


def digest(value: object) -> str:
    """sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(to_json({"value": value}).encode()).hexdigest()


def _saved(path: Path) -> Path | None:
    return next((file for suffix in SUFFIXES.values() if (file := path.with_suffix(suffix)).is_file()), None)


def _load(path: Path) -> Result:
    try:
        if path.suffix == ".arrow":
            with pa.OSFile(str(path), "rb") as source:
                return ipc.open_file(source).read_all()
        return load_file(str(path))
    except Exception as error:  # a file damaged on disk, whatever the reader raises
        raise ValueError(f"Checkpoint {path} cannot be read ({type(error).__name__}: {error}); delete {path.parent} "
                         "to compute that step from the start.") from None
