"""Open the warehouse as a read-only DuckDB connection with one view per table."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import duckdb
import pyarrow as pa

from refusal_core.storage import Location, check_readable, is_remote, shown

from refusal_core.tables import (
    ACTIVATIONS,
    DIRECTION_CANDIDATES,
    DIRECTIONS,
    EFFECTS,
    FEATURE_CARDS,
    FEATURE_EDGES,
    FEATURE_SETS,
    GENERATIONS,
    JAILBREAK_PAIRS,
    JAILBREAK_SUMMARY,
    LATENT_ATTRIBUTIONS,
    LATENT_GUARD,
    LINEAGE,
    PROBE_RESULTS,
    PROMPTS,
    SAE_QUALITY,
    SEQUENCE_PROJECTIONS,
)

SCHEMAS = {
    "prompts": PROMPTS,
    "activations": ACTIVATIONS,
    "baseline_generations": GENERATIONS,
    "refusal_directions": DIRECTION_CANDIDATES,
    "category_directions": DIRECTIONS,
    "saes": SAE_QUALITY,
    "intervention_generations": GENERATIONS,
    "intervention_effects": EFFECTS,
    "latent_attributions": LATENT_ATTRIBUTIONS,
    "feature_sets": FEATURE_SETS,
    "feature_cards": FEATURE_CARDS,
    "feature_generations": GENERATIONS,
    "feature_effects": EFFECTS,
    "refusal_along_sequence": SEQUENCE_PROJECTIONS,
    "feature_edges": FEATURE_EDGES,
    "jailbreak_generations": GENERATIONS,
    "eval_activations": ACTIVATIONS,
    "jailbreak_analysis": JAILBREAK_PAIRS,
    "jailbreak_summary": JAILBREAK_SUMMARY,
    "refusal_probes": PROBE_RESULTS,
    "latent_guard": LATENT_GUARD,
    "lineage": LINEAGE,
}
"""Every table of the warehouse; a view over a table with no file yet is empty but has its columns.
Views in views.sql that read no files ({root} not in them) are derived from the table views."""

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_VIEW = re.compile(r"CREATE VIEW (\w+) AS\s+(.*?);", re.S)


@contextmanager
def connect(root: Location) -> Iterator[ReadOnlyWarehouse]:
    """A DuckDB connection over the Parquet files under `root` (a folder or an object-store URL), accepting only queries."""
    check_readable(root)
    connection = duckdb.connect()
    if is_remote(root):
        # DuckDB reads the store through the same fsspec filesystem the pipeline writes with.
        connection.register_filesystem(root.fs)
    try:
        views = dict(_VIEW.findall(files("warehouse").joinpath("views.sql").read_text()))
        tables = {name for name, body in views.items() if "{root}" in body}
        assert tables == set(SCHEMAS), f"views.sql and SCHEMAS disagree: {tables ^ set(SCHEMAS)}"
        for name, body in views.items():
            if "{root}" not in body:
                continue
            if any((root / name).glob("model=*/*.parquet")):
                connection.execute(f"CREATE VIEW {name} AS " + body.replace("{root}", shown(root)))
            else:
                # The hive partition column `model` comes with the files; an empty view gets it too.
                connection.register(name, SCHEMAS[name].append(pa.field("model", pa.string())).empty_table())
        for name, body in views.items():
            if "{root}" not in body:
                connection.execute(f"CREATE VIEW {name} AS {body}")
        yield ReadOnlyWarehouse(connection)
    finally:
        connection.close()


class ReadOnlyWarehouse:
    """Runs SELECT (and EXPLAIN) statements only, so a query cannot change the warehouse."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._connection = connection

    def sql(self, query: str, params: list | None = None) -> duckdb.DuckDBPyRelation:
        statements = self._connection.extract_statements(query)
        if len(statements) != 1:
            raise ValueError(f"Give exactly one SQL statement, not {len(statements)}.")
        if statements[0].type not in _ALLOWED:
            raise ValueError(
                f"The warehouse is read-only: {statements[0].type.name} statements are refused; use SELECT "
                "(and --out FILE to save a result)."
            )
        return self._connection.sql(query, params=params)

    def rows(self, query: str, study: str) -> list[dict]:
        """The rows of `query` for one study (its `model` column), as dicts."""
        return self.sql(f"SELECT * FROM ({query}) WHERE model = ?", [study]).to_arrow_table().to_pylist()


_NAMED = re.compile(r"-- name: (\w+)\n-- (.*?)\n(.*?);", re.S)


def named_queries() -> dict[str, tuple[str, str]]:
    """Name to (description, SQL) of every query in queries.sql."""
    text = files("warehouse").joinpath("queries.sql").read_text()
    return {name: (description, sql.strip()) for name, description, sql in _NAMED.findall(text)}


def named_query(name: str) -> str:
    """The SQL of a named query, or a ValueError listing the names."""
    queries = named_queries()
    if name not in queries:
        raise ValueError(f"No query named {name!r}; the named queries are: {', '.join(sorted(queries))}.")
    return queries[name][1]


def write_result(relation: duckdb.DuckDBPyRelation, path: Path) -> None:
    """Save a query result as CSV or Parquet, by the file's suffix."""
    if path.suffix == ".csv":
        relation.write_csv(str(path))
    elif path.suffix == ".parquet":
        relation.write_parquet(str(path))
    else:
        raise ValueError(f"Cannot write {path.name}: use a .csv or .parquet file name.")
