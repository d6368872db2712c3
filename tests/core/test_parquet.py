import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refusal_core.parquet import file_metadata, spool, table_sha256, write_parquet

SCHEMA = pa.schema([pa.field("a", pa.int64(), nullable=False), pa.field("b", pa.string())])


def _table(n: int = 10) -> pa.Table:
    return pa.table({"a": list(range(n)), "b": [str(i) for i in range(n)]}, schema=SCHEMA)


def test_spool_hash_equals_table_hash_and_changes_with_content(tmp_path):
    table = _table()
    staged = spool([table], SCHEMA, tmp_path)
    assert staged.sha256 == table_sha256(table)
    assert staged.row_count == 10
    assert pa.Table.from_batches(list(staged.batches())).equals(table)
    assert table_sha256(_table(11)) != staged.sha256


def test_spool_rejects_extra_and_missing_columns(tmp_path):
    extra = _table().append_column("c", pa.array([0] * 10))
    with pytest.raises(ValueError, match=r"Columns \['c'\] are not in the table schema"):
        spool([extra], SCHEMA, tmp_path)
    with pytest.raises(ValueError, match=r"Columns \['b'\] are missing"):
        spool([_table().drop(["b"])], SCHEMA, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_parquet_is_atomic_when_interrupted(tmp_path):
    path = tmp_path / "t" / "data.parquet"
    write_parquet(path, SCHEMA, _table().to_batches(), {"k": "old"})

    def failing():
        yield _table(3).to_batches()[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_parquet(path, SCHEMA, failing(), {"k": "new"})
    assert pq.read_table(path).num_rows == 10
    assert file_metadata(path)["k"] == "old"
    assert [p.name for p in path.parent.iterdir()] == ["data.parquet"]


def test_same_rows_give_byte_identical_files(tmp_path):
    first, second = tmp_path / "1.parquet", tmp_path / "2.parquet"
    for path in (first, second):
        write_parquet(path, SCHEMA, _table().to_batches(), {"k": "v"})
    assert first.read_bytes() == second.read_bytes()


KILLED_WRITER = """
import sys, threading, time
from pathlib import Path
import pyarrow as pa
from refusal_core.parquet import spool, write_parquet
schema = pa.schema([pa.field("a", pa.int64(), nullable=False), pa.field("b", pa.string())])
def blocked():
    yield pa.record_batch({"a": [1], "b": ["x"]}, schema=schema)
    time.sleep(600)
root = Path(sys.argv[1])
threading.Thread(target=spool, args=(blocked(), schema, root / "staging"), daemon=True).start()
threading.Thread(target=write_parquet, args=(root / "t" / "data.parquet", schema, blocked(), {}), daemon=True).start()
time.sleep(600)
"""


def test_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys
    import time

    from refusal_core.storage import owned_temporary

    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)])
    try:
        for _ in range(600):
            left = sorted((tmp_path / "staging").glob("*.arrows")) + sorted((tmp_path / "t").glob(".data.parquet~*"))
            if len(left) == 2:
                break
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert len(left) == 2 and all(f"~{child.pid}~" in p.name for p in left)
    mine = owned_temporary(tmp_path / "staging", "spool", ".arrows")  # a live writer's file is left alone

    staged = spool([_table()], SCHEMA, tmp_path / "staging")
    assert sorted((tmp_path / "staging").iterdir()) == sorted([mine, staged.path])
    write_parquet(tmp_path / "t" / "data.parquet", SCHEMA, _table().to_batches(), {})
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["data.parquet"]
