from dataclasses import replace

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from refusal_core.parquet import write_parquet
from refusal_core.prompts import EVAL_SETS, HARMFUL_SETS
from refusal_core.tables import TABLES
from warehouse.query import connect, named_queries


def test_every_catalogued_table_is_a_view_empty_but_typed_before_anything_is_materialized(tmp_path):
    with connect(tmp_path) as warehouse:
        assert warehouse.sql("SELECT count(*) FROM prompts").fetchall() == [(0,)]
        for name, table in TABLES.items():
            assert warehouse.sql(f"SELECT * FROM {name}").columns == [*table.schema.names, "model"], name


def test_a_partition_of_an_older_schema_version_is_refused_in_one_sentence(tmp_path, monkeypatch):
    import dagster as dg

    from pipelines.io_manager import ParquetIOManager

    saes = TABLES["saes"]
    write_parquet(tmp_path / "saes" / "model=s" / "data.parquet", saes.schema, saes.schema.empty_table().to_batches(),
                  saes.file_metadata())
    with connect(tmp_path) as warehouse:
        assert warehouse.sql("SELECT count(*) FROM saes").fetchall() == [(0,)]
    monkeypatch.setitem(TABLES, "saes", replace(saes, version=2))  # the code moves on
    refusal = ("saes of study s was written with schema version 1 of table saes (this code reads version 2); "
               "re-run `refusal-sae run --study s --from saes`.")
    current = TABLES["saes"]
    row = {f.name: "x" if pa.types.is_string(f.type) else 0 for f in current.schema}
    write_parquet(tmp_path / "saes" / "model=t" / "data.parquet", current.schema,
                  pa.Table.from_pylist([row], schema=current.schema).to_batches(), current.file_metadata())
    prompts = TABLES["prompts"]  # a current table of the stale study: left out too, so no join sees half of it
    write_parquet(tmp_path / "prompts" / "model=s" / "data.parquet", prompts.schema,
                  pa.Table.from_pylist([{f.name: "x" for f in prompts.schema}], schema=prompts.schema).to_batches(),
                  prompts.file_metadata())
    with connect(tmp_path) as warehouse:  # the stale study is left out of every view and refused by name
        assert warehouse.stale == {"s": refusal}
        assert warehouse.sql("SELECT model, count(*) FROM saes GROUP BY model").fetchall() == [("t", 1)]
        assert warehouse.sql("SELECT count(*) FROM prompts").fetchall() == [(0,)]
        assert len(warehouse.rows("SELECT * FROM saes", "t")) == 1
        with pytest.raises(ValueError) as refused:
            warehouse.rows("SELECT * FROM saes", "s")
    assert str(refused.value) == refusal
    context = dg.build_input_context(asset_key=dg.AssetKey("saes"), partition_key="s")
    with pytest.raises(ValueError) as refused:
        ParquetIOManager(root=str(tmp_path)).load_input(context)
    assert str(refused.value) == refusal


def test_queries_cannot_change_the_warehouse(tmp_path):
    with connect(tmp_path) as warehouse:
        for statement in ("COPY prompts TO 'x.csv'", "CREATE TABLE t AS SELECT 1", "INSTALL httpfs"):
            with pytest.raises(ValueError, match="The warehouse is read-only"):
                warehouse.sql(statement)
        with pytest.raises(ValueError, match="exactly one SQL statement"):
            warehouse.sql("SELECT 1; SELECT 2")


def test_queries_read_no_file_outside_the_warehouse(tmp_path):
    outside = tmp_path / "secret.csv"
    outside.write_text("token\nabc\n")
    root = tmp_path / "warehouse"
    root.mkdir()
    with connect(root) as warehouse:
        for query in (f"SELECT * FROM read_text('{outside}')", f"SELECT * FROM read_csv('{outside}')",
                      f"SELECT * FROM read_text('{root}/../secret.csv')", "SELECT * FROM read_text('/etc/hostname')"):
            with pytest.raises(ValueError, match=r"^The query reads outside the warehouse \(.*\), which is refused"):
                warehouse.sql(query)
        # Nor can a query lift the bound: the configuration is locked.
        with pytest.raises(ValueError, match="read-only"):
            warehouse.sql("SET enable_external_access = true")
        with pytest.raises(duckdb.Error, match="locked"):
            warehouse._connection.execute("SET enable_external_access = true")
        assert warehouse.sql("SELECT count(*) FROM prompts").fetchall() == [(0,)]


def test_sql_command_reads_materialized_tables(tiny_registry, tmp_path, monkeypatch, capsys):
    import dagster as dg

    from tests.pipelines.test_study_graph import _materialize

    warehouse = tmp_path / "warehouse"
    with dg.instance_for_test() as instance:
        assert _materialize(tiny_registry, warehouse, "tiny-qwen2", instance).success
    monkeypatch.setenv("REFUSAL_SAE_WAREHOUSE", str(warehouse))
    assert main(["sql", "SELECT model, label, count(*) AS n FROM prompts GROUP BY ALL ORDER BY ALL"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-qwen2" in printed and "over_refusal" in printed
    out = tmp_path / "layers.csv"
    assert main(["sql", "SELECT DISTINCT layer_index FROM activations ORDER BY 1", "--out", str(out)]) == 0
    assert out.read_text().split() == ["layer_index", "0", "1", "2"]
    assert main(["sql", "DROP VIEW prompts"]) == 2
    assert main(["sql", "SELECT direction_a, direction_b, round(cosine, 6) AS c FROM direction_cosines ORDER BY ALL"]) == 0
    assert "harmfulness" in capsys.readouterr().out
    for name in named_queries():
        assert main(["query", name, "--out", str(tmp_path / f"{name}.parquet")]) == 0, name
    main_table = pq.read_table(tmp_path / "main_table.parquet").to_pylist()
    assert {(r["eval_set"], r["method"]) for r in main_table} == {
        *((name, "none") for name in EVAL_SETS), *((name, "ablate") for name in (*HARMFUL_SETS, "over_refusal")),
        ("alpaca_eval", "add")}
    assert pq.read_table(tmp_path / "cross_study.parquet").column("model").to_pylist() == ["tiny-qwen2"]
    assert main(["lineage", "intervention_effects"]) == 0
    tree = capsys.readouterr().out
    assert tree.count("prompts  sha256") >= 4 and "activations  sha256" in tree and "weights: local:" in tree
    assert "STALE" not in tree
    path = warehouse / "refusal_directions" / "model=tiny-qwen2" / "data.parquet"
    assert main(["lineage", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("refusal_directions  sha256")
    assert main(["lineage", "nope"]) == 2
    assert "No lineage for 'nope' of study 'tiny-qwen2'" in capsys.readouterr().err
    assert main(["sql", "SELECT no_such_column FROM prompts"]) == 2
    assert "no_such_column" in capsys.readouterr().err
    assert main(["query", "nope"]) == 2
    assert "No query named 'nope'; the named queries are: attribution_by_layer, capability_table, category_cosines" in capsys.readouterr().err


def test_the_main_tables_show_each_rate_with_its_wilson_interval_and_n_and_each_paired_difference(tmp_path):
    from refusal_core.evaluation import effect_rows
    from tests.core.test_evaluation import _generation

    ids = [f"p{i:02d}" for i in range(32)]
    baseline = [_generation(i, "none", k < 17) for k, i in enumerate(ids)]
    ablated = [_generation(i, "ablate", False) for i in ids]
    effects = TABLES["intervention_effects"]
    rows = effect_rows("m", baseline + ablated, baseline)
    write_parquet(tmp_path / "intervention_effects" / "model=s" / "data.parquet", effects.schema,
                  pa.Table.from_pylist(rows, schema=effects.schema).to_batches(), effects.file_metadata())
    with connect(tmp_path) as warehouse:
        for name in ("main_table", "feature_table"):
            shown = {r["method"]: r for r in warehouse.rows(named_queries()[name][1], "s") if r["judge"] == "substring"}
            baseline_row = shown["none" if name == "main_table" else "baseline"]
            ablated_row = shown["ablate" if name == "main_table" else "direction ablation"]
            assert baseline_row["rate_ci"] == "53% [36, 69] n=32" and baseline_row["difference_ci"] is None
            assert ablated_row["rate_ci"] == "0% [0, 11] n=32" and ablated_row["ci_high"] == 0.107
            assert ablated_row["difference_ci"].startswith("-53 [") and ablated_row["difference"] == -0.531
