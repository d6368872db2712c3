"""Open the warehouse as a read-only DuckDB connection with one view per table."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import duckdb
import pyarrow as pa

from refusal_core.parquet import file_metadata
from refusal_core.storage import Location, check_readable, is_remote, shown, write_atomically
from refusal_core.tables import TABLES

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_VIEW = re.compile(r"CREATE VIEW (\w+) AS\s+(.*?);", re.S)


@contextmanager
def connect(root: Location) -> Iterator[ReadOnlyWarehouse]:
    """A DuckDB connection over the Parquet files under `root` (a folder or an object-store URL), accepting only queries.

    A study with a file written with another schema version than its table's catalogue entry is left
    out of every view (all its tables, so no join sees half of it) rather than read with the wrong
    columns; `ReadOnlyWarehouse.stale` holds, per study, the sentence naming the run that rewrites it,
    and `rows` of that study raises it.
    """
    check_readable(root)
    connection = duckdb.connect()
    if is_remote(root):
        # DuckDB reads the store through the same fsspec filesystem the pipeline writes with.
        connection.register_filesystem(root.fs)
    stale: dict[str, str] = {}
    files_of = {name: sorted((root / name).glob("model=*/*.parquet")) for name in TABLES}
    for name, paths in files_of.items():
        for path in paths:
            study = path.parent.name.removeprefix("model=")
            if refusal := TABLES[name].mismatch(file_metadata(path), study):
                stale.setdefault(study, refusal)
    try:
        for table in TABLES.values():
            # One view per table over the current studies' files; a table with no such file is empty but has its columns.
            current = [f"'{shown(root)}/{table.name}/{path.parent.name}/{path.name}'" for path in files_of[table.name]
                       if path.parent.name.removeprefix("model=") not in stale]
            if current:
                connection.execute(f"CREATE VIEW {table.name} AS SELECT * FROM read_parquet("
                                   f"[{', '.join(current)}], hive_partitioning = true)")
            else:
                # The hive partition column `model` comes with the files; an empty view gets it too.
                columns = table.schema.append(pa.field("model", pa.string()))
                connection.execute(f"CREATE VIEW {table.name} AS {_no_rows(columns)}")
        for name, body in _VIEW.findall(files("warehouse").joinpath("views.sql").read_text()):
            connection.execute(f"CREATE VIEW {name} AS {body}")
        # The views read their Parquet files lazily, so file access stays on for the warehouse's own folder only,
        # and the configuration is locked so that no query turns it back on.
        connection.execute(f"SET allowed_directories = ['{shown(root)}/']")
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        yield ReadOnlyWarehouse(connection, stale, shown(root))
    finally:
        connection.close()


class ReadOnlyWarehouse:
    """Runs SELECT (and EXPLAIN) statements only, so a query cannot change the warehouse, over a connection that
    reads no file outside the warehouse."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, stale: dict[str, str] | None = None,
                 root: str = "the warehouse") -> None:
        self._connection = connection
        self._root = root
        self.stale = stale or {}
        """Study -> the sentence refusing its files of an older schema version (left out of every view)."""

    def sql(self, query: str, params: list | None = None) -> duckdb.DuckDBPyRelation:
        statements = self._connection.extract_statements(query)
        if len(statements) != 1:
            raise ValueError(f"Give exactly one SQL statement, not {len(statements)}.")
        if statements[0].type not in _ALLOWED:
            raise ValueError(
                f"The warehouse is read-only: {statements[0].type.name} statements are refused; use SELECT "
                "(and --out FILE to save a result)."
            )
        try:
            return self._connection.sql(query, params=params)
        except duckdb.PermissionException as error:
            raise ValueError(f"The query reads outside the warehouse ({self._root}), which is refused: query its "
                             f"tables and views only (refusal-sae query lists them). DuckDB said: {error}") from None

    def rows(self, query: str, study: str) -> list[dict]:
        """The rows of `query` for one study (its `model` column), as dicts; a ValueError if that study's files are stale."""
        if study in self.stale:
            raise ValueError(self.stale[study])
        return self.sql(f"SELECT * FROM ({query}) WHERE model = ?", [study]).to_arrow_table().to_pylist()


def _no_rows(schema: pa.Schema) -> str:
    """A SELECT of no rows with the columns of `schema`, typed as DuckDB reads them from Parquet.

    Written in SQL: registering an empty Arrow table instead makes DuckDB import pandas (~0.3 s of a command).
    """
    columns = ", ".join(f'CAST(NULL AS {_sql_type(field.type)}) AS "{field.name}"' for field in schema)
    return f"SELECT {columns} WHERE false"


_SQL_TYPES = {pa.bool_(): "BOOLEAN", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
              pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR"}


def _sql_type(type_: pa.DataType) -> str:
    """The DuckDB type of a catalogue column's Arrow type (a KeyError names a type to add to _SQL_TYPES)."""
    if pa.types.is_list(type_):
        return f"{_sql_type(type_.value_type)}[]"
    if pa.types.is_struct(type_):
        return "STRUCT(" + ", ".join(f'"{field.name}" {_sql_type(field.type)}' for field in type_) + ")"
    return _SQL_TYPES[type_]


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
    """Save a query result as CSV or Parquet, by the file's suffix, whole or not at all.

    The warehouse's connection may write no file, so the result is written by a connection of its own, which
    sees nothing but the result."""
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"Cannot write {path.name}: use a .csv or .parquet file name.")
    table = relation.to_arrow_table()

    def write(temporary: Path) -> None:
        with duckdb.connect() as writer:
            result = writer.from_arrow(table)
            result.write_csv(str(temporary)) if path.suffix == ".csv" else result.write_parquet(str(temporary))

    write_atomically(path, write)
