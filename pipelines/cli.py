"""The `refusal-sae` command: run a study, list studies, generate or judge answers, query the warehouse."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import duckdb

from pipelines import paths
from refusal_core.registry import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal-sae", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Materialize every asset of a study (the main job).")
    run.add_argument("--study", help="Registry key; the registry's default when left out.")
    run.add_argument("--from", dest="start", metavar="ASSET",
                     help="Re-materialize ASSET and everything downstream of it, changed or not, reading the rest from the warehouse.")
    run.add_argument("--force", action="store_true",
                     help="Re-materialize every asset, even those whose code, settings and inputs are unchanged.")
    run.add_argument("--dtype", **DTYPE_ARGUMENT)
    run.add_argument("--verbose", action="store_true",
                     help="Show Dagster's event log live, as well as writing it to its file.")
    commands.add_parser("studies", help="List the studies in the registry.")
    gen = commands.add_parser("generate", help="Generate and judge answers to a prompt file, optionally intervening.")
    gen.add_argument("--study", help="Registry key; the registry's default when left out.")
    gen.add_argument("--model", dest="study", help=argparse.SUPPRESS)  # the old name of --study, still accepted
    gen.add_argument("--prompts", type=Path, required=True, help=".txt (one prompt a line) or .jsonl with a text field.")
    gen.add_argument("--intervention", default="none",
                     help="none (default); ablate or add[:COEF] (the study's selected refusal direction, COEF default 1); "
                          "clamp[:SET[:MULT]] (a stored feature set's latents x -MULT: SET default cossim_ap, or cosine, "
                          "activation_difference, attribution, upstream, random, random@SEED; MULT default the study's "
                          "clamp_multiplier); induce[:SET[:SCALE]] (cossim_ap or random set to the stored constants x SCALE, "
                          "default 1).")
    gen.add_argument("--max-new-tokens", type=int, help="Default: the study's setting.")
    gen.add_argument("--dtype", **DTYPE_ARGUMENT)
    gen.add_argument("--out", type=Path, required=True, help="Parquet file to write the judged rows to.")
    judge = commands.add_parser("judge", help="Judge answers in a .csv, .jsonl or .parquet file with the judges that read answers.")
    judge.add_argument("--in", dest="input", type=Path, required=True, help=".csv (with a header), .jsonl or .parquet file of answers.")
    judge.add_argument("--prompt-column", required=True, help="Column holding the request each answer responds to.")
    judge.add_argument("--answer-column", required=True, help="Column holding the answers.")
    judge.add_argument("--study", help="Registry key whose classifier judge (if it names one) judges too; "
                                       "left out, only the substring judge runs and no registry is read.")
    judge.add_argument("--out", type=Path, required=True, help="Parquet file to write the verdicts to.")
    export = commands.add_parser("export-saes", help="Write a study's SAEs as sae-lens folders with a model card.")
    export.add_argument("--study", help="Registry key; the registry's default when left out.")
    export.add_argument("--out", type=Path, required=True, help="A new (or empty) folder: one layer_N/ per SAE and README.md.")
    sql = commands.add_parser("sql", help="Run a read-only SQL query over the warehouse views.")
    sql.add_argument("query")
    sql.add_argument("--out", type=Path, help="Write the result to a .csv or .parquet file instead of printing it.")
    query = commands.add_parser("query", help="Run a named query (leave NAME out to list them).")
    query.add_argument("name", nargs="?")
    query.add_argument("--out", type=Path, help="Write the result to a .csv or .parquet file instead of printing it.")
    lineage = commands.add_parser("lineage", help="Print where a table came from, back to the weights and code.")
    lineage.add_argument("target", help="Asset name (e.g. intervention_effects) or path of one of its Parquet files.")
    lineage.add_argument("--study", help="Study key, when the warehouse holds several.")
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "studies": _studies, "sql": _sql, "generate": _generate,
                "judge": _judge, "export-saes": _export_saes, "query": _query, "lineage": _lineage}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, duckdb.Error) as error:
        print(f"refusal-sae: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2


DTYPE_ARGUMENT = {
    "default": None, "metavar": "DTYPE", "type": lambda value: value if value in DTYPES else _bad_dtype(value),
    "help": "auto (bf16 on CUDA and on CPUs with native bf16, float32 elsewhere), float32, bfloat16 or float16; "
            "default: the study's dtype."}


def _bad_dtype(value: str):
    raise argparse.ArgumentTypeError(f"unknown dtype {value!r}; choose one of {', '.join(DTYPES)}")


def _run(args: argparse.Namespace) -> int:
    import dagster as dg

    from pipelines.console import StepLines, register
    from pipelines.definitions import ASSETS, build_definitions, study_job
    from pipelines.partitions import SETTINGS, studies
    from pipelines.staleness import behind, current_settings
    from refusal_core.registry import load_registry
    from refusal_core.storage import check_writable, shown

    registry = load_registry(paths.registry_path())
    key = args.study or registry.default
    registry.get(key)
    check_writable(paths.warehouse_root())
    defs = build_definitions(dtype=args.dtype or "")
    instance = _instance()
    if not instance.has_dynamic_partition(studies.name, key):
        instance.add_dynamic_partitions(studies.name, [key])
    graph = defs.resolve_asset_graph()
    if args.start:
        names = sorted(k.to_user_string() for k in graph.get_all_asset_keys() if k.path[0] != SETTINGS)
        if args.start not in names:
            raise ValueError(f"--from {args.start!r} is not an asset; choose one of {', '.join(names)}.")
    settings = current_settings(defs.resources["study"], key, ASSETS)
    if args.force:
        selection = None
    elif args.start:
        selection = sorted(dg.AssetSelection.assets(args.start).downstream().resolve(graph), key=str)
    else:
        stale = behind(instance, ASSETS, key, settings)
        _print_plan(stale, len(ASSETS))
        if not stale:
            print(f"Study {key!r} is up to date: nothing to do (--force re-materializes it all).")
            return 0
        selection = list(stale)
    _release_abandoned_runs(instance)
    started = time.perf_counter()
    total = len(selection) if selection is not None else len(ASSETS)
    register("cli", StepLines(total, lambda step: _key_number(instance, step, key)))
    log = paths.dagster_home() / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{key}.log"
    loggers = {"steps": {"config": {"handler": "cli"}}, "event_file": {"config": {"path": str(log)}}}
    if args.verbose:
        loggers["console"] = {"config": {"log_level": "DEBUG"}}
    print(f"Running {total} assets of study {key!r}; Dagster's event log: {log}" + ("" if args.verbose else " (--verbose shows it here)"))
    result = defs.resolve_job_def(study_job.name).execute_in_process(
        run_config={"loggers": loggers}, partition_key=key, instance=instance, raise_on_error=False,
        asset_selection=selection, tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()},
    )
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"refusal-sae: step {event.step_key} failed: {failure_message(event)}", file=sys.stderr)
        return 1
    root = shown(paths.warehouse_root())
    print(f"\nStudy {key!r} done in {time.perf_counter() - started:.0f} s.")
    print(f"  Report:         {root}/report/model={key}/index.html  (every study: {root}/report/index.html)")
    print(f"  Figures:        {root}/figures/model={key}/")
    print(f"  Parquet tables: {root}/<table>/model={key}/data.parquet")
    print(f"  Lineage:        refusal-sae lineage intervention_effects --study {key}")
    print("  Try:            refusal-sae query feature_table")
    return 0


def _key_number(instance, step: str, key: str) -> str:
    """The first number a step's materialization recorded for `key` (its own metadata before Dagster's row count)."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(step), asset_partitions=[key]), limit=1).records
    if not records:
        return ""
    metadata = records[0].asset_materialization.metadata
    numbers = [(name, value.value) for name, value in metadata.items()
               if isinstance(value.value, (int, float)) and not isinstance(value.value, bool)]
    own = [(name, number) for name, number in numbers if not name.startswith("dagster/")]
    if own:
        name, number = own[0]
        return f"{name} {number:.3g}" if isinstance(number, float) else f"{name} {number}"
    rows = dict(numbers).get("dagster/row_count")
    return "" if rows is None else f"{rows} rows"


def _print_plan(stale: dict, total: int) -> None:
    """Say which assets a run re-materializes and why, and how many it skips as up to date."""
    print(f"Skipping {total - len(stale)} of {total} assets: their code, settings and inputs are unchanged.")
    by_reason: dict[str, list[str]] = {}
    for asset, why in stale.items():
        by_reason.setdefault(why, []).append(asset.to_user_string())
    for why, names in by_reason.items():
        print(f"  {why}: {', '.join(names)}")


PID_TAG, HOST_TAG = "refusal_sae/pid", "refusal_sae/host"
"""Run tags saying which process on which machine runs a `refusal-sae run`."""


def _release_abandoned_runs(instance) -> None:
    """Mark this machine's `refusal-sae run`s whose process is gone (killed) as failed and free their pool slots.

    Otherwise a killed run keeps its `gpu` pool slot and the next run waits for it forever.
    """
    import dagster as dg

    from refusal_core.storage import process_alive

    live = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
                         tags={HOST_TAG: socket.gethostname()})
    for run in instance.get_runs(filters=live):
        pid = int(run.tags.get(PID_TAG, "0"))
        if pid and not process_alive(pid):
            instance.report_run_failed(run, f"Its process ({pid}) ended without finishing the run.")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            print(f"refusal-sae: released run {run.run_id}, whose process {pid} is gone.", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    from refusal_core.chat import format_prompt
    from refusal_core.evaluation import judged_generations
    from refusal_core.judges import ClassifierJudge
    from refusal_core.models import load_model
    from refusal_core.named_interventions import named_intervention
    from refusal_core.prompts import prompt_id, read_prompt_file
    from refusal_core.registry import load_registry, with_dtype
    from refusal_core.scoring import refusal_token_ids
    from refusal_core.parquet import write_parquet
    from refusal_core.tables import GENERATIONS

    if args.out.suffix != ".parquet":
        raise ValueError(f"--out must name a .parquet file, not {args.out.name}.")
    registry = load_registry(paths.registry_path())
    study = with_dtype(registry.get(args.study or registry.default), args.dtype)
    rows = read_prompt_file(args.prompts)
    build = named_intervention(args.intervention, study, lambda table: _stored_table(table, study.key))
    loaded = load_model(study, paths.cache_dir())
    intervention = build(loaded)
    spec = study.settings.classifier_judge
    classifier = ClassifierJudge(spec, paths.cache_dir() / "judges" / "cli.json") if spec else None
    texts = [format_prompt(loaded.tokenizer, row["text"], study.chat_template) for row in rows]
    table = judged_generations(
        loaded.model, loaded.tokenizer, texts, [prompt_id(row["text"]) for row in rows], [row["category"] for row in rows],
        study.key, refusal_token_ids(loaded.model, loaded.tokenizer), intervention,
        args.max_new_tokens or study.settings.max_new_tokens, study.settings.batch_size,
        classifier, [row["text"] for row in rows])
    write_parquet(args.out, GENERATIONS, table.to_batches(), {"refusal_sae.model_source": loaded.source,
                                                                "refusal_sae.model_sha256": loaded.weights_sha256})
    refused = sum(table["refused_substring"].to_pylist())
    print(f"Wrote {table.num_rows} judged answers to {args.out} ({refused} refused by substring).")
    return 0


def _stored_table(table: str, key: str):
    """The study's stored `table` from the warehouse, or None when it was never materialized."""
    from refusal_core.parquet import read_parquet

    path = paths.warehouse_root() / table / f"model={key}" / "data.parquet"
    return read_parquet(path) if path.exists() else None


def _export_saes(args: argparse.Namespace) -> int:
    from refusal_core.registry import load_registry
    from refusal_core.sae_export import export_saes, published_name

    registry = load_registry(paths.registry_path())
    study = registry.get(args.study or registry.default)
    saes = _stored_table("saes", study.key)
    if saes is None:
        raise FileNotFoundError(f"Study {study.key!r} has no stored saes yet; run `refusal-sae run --study {study.key}` first.")
    written, published = export_saes(saes, study, args.out)
    for line in published:
        print(line)
    print(f"Wrote {len(written)} SAE(s) of {published_name(study)} to {args.out} ({', '.join(p.name for p in written)}) "
          "with a model card, README.md; load one with sae_lens.SAE.load_from_disk.")
    return 0


def _judge(args: argparse.Namespace) -> int:
    from refusal_core.judges import ClassifierJudge, judge_answers, read_answer_file
    from refusal_core.parquet import write_parquet
    from refusal_core.tables import JUDGED_ANSWERS

    if args.out.suffix != ".parquet":
        raise ValueError(f"--out must name a .parquet file, not {args.out.name}.")
    prompts, answers = read_answer_file(args.input, args.prompt_column, args.answer_column)
    classifier = None
    if args.study:
        from refusal_core.registry import load_registry

        spec = load_registry(paths.registry_path()).get(args.study).settings.classifier_judge
        classifier = ClassifierJudge(spec, paths.cache_dir() / "judges" / "cli.json") if spec else None
    table = judge_answers(prompts, answers, classifier)
    write_parquet(args.out, JUDGED_ANSWERS, table.to_batches(), {"refusal_sae.answers_file": str(args.input)})
    refused = sum(table["refused_substring"].to_pylist())
    judges = "substring and classifier" if classifier else "substring"
    print(f"Wrote {args.out}: {table.num_rows} answer(s) judged by {judges}, {refused} refused by substring.")
    return 0


def _studies(args: argparse.Namespace) -> int:
    from refusal_core.registry import load_registry

    registry = load_registry(paths.registry_path())
    for key, study in registry.studies.items():
        marker = "*" if key == registry.default else " "
        print(f"{marker} {key:32} {study.weights.kind:10} {study.description}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from warehouse.query import named_queries, named_query

    if args.name is None:
        for name, (description, _) in sorted(named_queries().items()):
            print(f"  {name:22} {description}")
        return 0
    return _show(named_query(args.name), args.out)


def _lineage(args: argparse.Namespace) -> int:
    from refusal_core.storage import check_readable
    from warehouse.lineage import lineage_tree, resolve

    root = paths.warehouse_root()
    check_readable(root)
    artifact, study = resolve(root, args.target, args.study)
    print(f"study {study}")
    print("\n".join(lineage_tree(root, artifact, study)))
    return 0


def _sql(args: argparse.Namespace) -> int:
    return _show(args.query, args.out)


def _show(sql: str, out: Path | None) -> int:
    from warehouse.query import connect, write_result

    with connect(paths.warehouse_root()) as connection:
        for refusal in connection.stale.values():
            print(f"refusal-sae: the study is left out of every view: {refusal}", file=sys.stderr)
        relation = connection.sql(sql)
        if out:
            write_result(relation, out)
            print(f"Wrote {out}")
        else:
            relation.show(max_width=200, max_rows=100)
    return 0


def failure_message(event) -> str:
    """The user's error behind a Dagster step failure, without Dagster's wrapping; a stopped step says so in words."""
    error = event.event_specific_data.error
    while error.cause is not None:
        error = error.cause
    if error.cls_name == "DagsterExecutionInterruptedError":
        return "interrupted before it finished; `refusal-sae run` again resumes it after its last finished batch."
    return error.message.strip()


def _instance():
    """Dagster's instance from $DAGSTER_HOME, else a persistent one in .dagster_home (the UI started with the same
    DAGSTER_HOME sees its runs); an instance database that cannot be reached is one sentence, before anything runs."""
    import logging

    import dagster as dg
    import sqlalchemy.exc

    home = paths.dagster_home()
    if not os.environ.get("DAGSTER_HOME"):
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            shutil.copy(paths.REPOSITORY / "dagster.yaml", home / "dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(home)
    # dagster-postgres warns through the root logger at each connection retry; keep that off the console.
    root, quiet = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        return dg.DagsterInstance.get()
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, sqlalchemy.exc.OperationalError):
            cause = cause.__cause__
        # psycopg2's errors carry a `pgcode` (None when no connection was made); SQLite's do not.
        if cause is None or not hasattr(cause.orig, "pgcode"):
            raise
        reason = (str(cause.orig).strip().splitlines() or [type(cause.orig).__name__])[0]
        raise RuntimeError(f"Dagster's instance database, set in {home / 'dagster.yaml'}, cannot be reached ({reason}): "
                           "start that server or correct the storage settings there.") from error
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
