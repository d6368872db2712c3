"""The `refusal-sae` command: run a study, list studies, query the warehouse."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from pipelines import paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal-sae", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Materialize every asset of a study (the main job).")
    run.add_argument("--study", help="Registry key; the registry's default when left out.")
    commands.add_parser("studies", help="List the studies in the registry.")
    sql = commands.add_parser("sql", help="Run a read-only SQL query over the warehouse views.")
    sql.add_argument("query")
    sql.add_argument("--out", type=Path, help="Write the result to a .csv or .parquet file instead of printing it.")
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "studies": _studies, "sql": _sql}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"refusal-sae: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import dagster as dg

    from pipelines.definitions import defs, study_job
    from pipelines.partitions import studies
    from refusal_core.registry import load_registry

    registry = load_registry(paths.registry_path())
    key = args.study or registry.default
    registry.get(key)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else _local_instance()
    if not instance.has_dynamic_partition(studies.name, key):
        instance.add_dynamic_partitions(studies.name, [key])
    started = time.perf_counter()
    result = defs.resolve_job_def(study_job.name).execute_in_process(
        partition_key=key, instance=instance, raise_on_error=False
    )
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"refusal-sae: step {event.step_key} failed: {failure_message(event)}", file=sys.stderr)
        return 1
    root = paths.warehouse_root()
    print(f"\nStudy {key!r} done in {time.perf_counter() - started:.0f} s.")
    print(f"  Parquet tables: {root}/<table>/model={key}/data.parquet")
    print(f"  Lineage:        {root}/lineage/model={key}/")
    print(f"  Try:            refusal-sae sql \"SELECT label, split, count(*) AS n FROM prompts GROUP BY ALL ORDER BY ALL\"")
    return 0


def _studies(args: argparse.Namespace) -> int:
    from refusal_core.registry import load_registry

    registry = load_registry(paths.registry_path())
    for key, study in registry.studies.items():
        marker = "*" if key == registry.default else " "
        print(f"{marker} {key:32} {study.weights.kind:10} {study.description}")
    return 0


def _sql(args: argparse.Namespace) -> int:
    from warehouse.query import connect, write_result

    with connect(paths.warehouse_root()) as connection:
        relation = connection.sql(args.query)
        if relation is None:
            raise ValueError("The statement returned no rows; only queries (SELECT, DESCRIBE, SHOW) are allowed.")
        if args.out:
            write_result(relation, args.out)
            print(f"Wrote {args.out}")
        else:
            relation.show(max_width=200, max_rows=100)
    return 0


def failure_message(event) -> str:
    """The user's error behind a Dagster step failure, without Dagster's wrapping."""
    error = event.event_specific_data.error
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _local_instance():
    """A persistent instance in .dagster_home (the UI started with the same DAGSTER_HOME sees its runs)."""
    import dagster as dg

    home = paths.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(paths.REPOSITORY / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


if __name__ == "__main__":
    sys.exit(main())
