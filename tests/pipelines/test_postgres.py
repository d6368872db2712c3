"""Dagster's instance on a real PostgreSQL server: the registry sensor in the daemon, a multiprocess run under the
shipped `gpu` pool limit, and a server that cannot be reached."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines import paths
from pipelines.cli import main
from refusal_core.tables import TABLES


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The folder of the server's programs: Debian's newest /usr/lib/postgresql/<version>/bin, else the one on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    candidates = versions[::-1] + ([Path(shutil.which("pg_ctl")).parent] if shutil.which("pg_ctl") else [])
    return next((c for c in candidates if all((c / name).exists() for name in ("initdb", "pg_ctl", "createdb"))), None)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with an empty `dagster` database, run from a temporary folder by an
    unprivileged user (the server refuses to run as root); yields its port."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed here (Debian: apt-get install postgresql; .ci/run installs it).")
    user = "nobody" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="refusal-sae-postgres-", dir="/tmp" if user else None))  # one nobody can enter
    port, data = _free_port(), folder / "data"

    def pg(*args, check=True):
        subprocess.run([str(a) for a in args], check=check, user=user, capture_output=True, timeout=120)

    try:
        if user:
            shutil.chown(folder, user)
        pg(bin_dir / "initdb", "-D", data, "-U", "dagster", "--auth=trust")
        pg(bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "-w", "start")
        pg(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "dagster", "dagster")
        yield port
    finally:
        if (data / "postmaster.pid").exists():
            pg(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def _home(folder: Path, port: int) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is the shipped one (its pool limits) with Postgres storage, as the README says."""
    settings = yaml.safe_load((paths.REPOSITORY / "dagster.yaml").read_text())
    settings["storage"] = {"postgres": {"postgres_db": {
        "hostname": "127.0.0.1", "port": port, "username": "dagster", "password": "", "db_name": "dagster",
        "scheme": "postgresql+psycopg2"}}}
    folder.mkdir()
    (folder / "dagster.yaml").write_text(yaml.safe_dump(settings))
    return folder


@contextmanager
def _dagster(*args: str, log: Path):
    """Dagster's own command line (the executable next to this Python) from the repository root, its output in `log`;
    on leaving, it and the processes it started (step processes, code servers) are stopped if still running."""
    with log.open("w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / args[0]), *args[1:]], cwd=paths.REPOSITORY,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


GPU_STEPS = ["activations", "baseline_generations", "jailbreak_generations"]
"""Three model-loading steps that all become ready when `prompts` is done."""


def test_sensor_and_a_multiprocess_run_keep_their_state_in_postgres_and_the_gpu_pool_holds(
        postgres, tiny_registry, tmp_path, monkeypatch):
    home = _home(tmp_path / "home", postgres)
    warehouse = tmp_path / "warehouse"
    for name, value in {"DAGSTER_HOME": home, "REFUSAL_SAE_REGISTRY": tiny_registry,
                        "REFUSAL_SAE_WAREHOUSE": warehouse, "REFUSAL_SAE_CACHE": tmp_path / "cache"}.items():
        monkeypatch.setenv(name, str(value))
    assert all(TABLES[step].needs_model for step in GPU_STEPS)

    # The daemon's registry sensor registers every study of the registry as a partition, in Postgres.
    with _dagster("dagster-daemon", "run", "-m", "pipelines.definitions", log=tmp_path / "daemon.log") as daemon:
        deadline = time.monotonic() + 180
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            while set(instance.get_dynamic_partitions("study")) != {"tiny-qwen2", "tiny-gemma2"}:
                assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
                time.sleep(1)

    # A run with the job's own executor, multiprocess: each step its own process, two at once.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}}))
    with _dagster("dagster", "job", "execute", "-m", "pipelines.definitions", "-j", "study", "-c", str(config),
                  "-o", ",".join(["prompts", *GPU_STEPS]), "--tags", '{"dagster/partition": "tiny-qwen2"}',
                  log=tmp_path / "run.log") as job:
        job.wait(timeout=600)
    log = (tmp_path / "run.log").read_text()
    assert job.returncode == 0, log[-3000:]
    assert "multiprocess executor" in log

    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags["dagster/partition"] == "tiny-qwen2"
        events = [record.event_log_entry for record in instance.get_records_for_run(run.run_id, limit=10_000).records]
        span: dict[str, list[float]] = {}
        for entry in events:
            if entry.dagster_event_type in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS):
                span.setdefault(entry.step_key, []).append(entry.timestamp)
        assert set(span) == {"prompts", *GPU_STEPS} and all(len(times) == 2 for times in span.values())
        # The limit acted (more than one model-loading step was ready at once) and held: their spans never overlap.
        blocked = {e.step_key for e in events if "blocked by limit for pool gpu" in (e.user_message or "")}
        assert blocked, "no step ever waited for the gpu pool"
        ordered = sorted(span[step] for step in GPU_STEPS)
        assert all(earlier[1] <= later[0] for earlier, later in zip(ordered, ordered[1:])), ordered
        assert span["prompts"][1] <= ordered[0][0]
        # Materializations, with their data versions, are in Postgres; the tables are in the warehouse.
        for step in ["prompts", *GPU_STEPS]:
            (record,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(step), asset_partitions=["tiny-qwen2"]), limit=5).records
            assert record.asset_materialization.tags["dagster/data_version"]
            assert (warehouse / step / "model=tiny-qwen2" / "data.parquet").exists()


def test_run_against_a_postgres_that_cannot_be_reached_says_so_in_one_sentence(tiny_registry, tmp_path, monkeypatch, capsys):
    home = _home(tmp_path / "home", _free_port())  # nothing listens there
    warehouse = tmp_path / "warehouse"
    for name, value in {"DAGSTER_HOME": home, "REFUSAL_SAE_REGISTRY": tiny_registry,
                        "REFUSAL_SAE_WAREHOUSE": warehouse, "REFUSAL_SAE_CACHE": tmp_path / "cache"}.items():
        monkeypatch.setenv(name, str(value))
    assert main(["run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("refusal-sae: Dagster's instance database, set in ") and "\n" not in error, error
    assert "Connection refused" in error and f"{home / 'dagster.yaml'}" in error
    assert not warehouse.exists() or not any(warehouse.iterdir())  # stopped before any step
