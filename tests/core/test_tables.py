from dataclasses import replace

from refusal_core.tables import SCHEMA_VERSION_KEY, TABLES


def test_catalogue_describes_every_table_and_field():
    for name, table in TABLES.items():
        assert table.name == name and table.description and table.version >= 1
        assert all((field.metadata or {}).get(b"description") for field in table.schema), name


def test_a_file_of_another_schema_version_is_refused_in_one_sentence():
    saes = TABLES["saes"]
    assert saes.mismatch(saes.file_metadata(), "s") is None
    assert saes.mismatch({}, "s") is None  # files from before versions were recorded are version 1
    refusal = replace(saes, version=2).mismatch(saes.file_metadata(), "s")
    assert refusal == ("saes of study s was written with schema version 1 of table saes (this code reads version 2); "
                       "re-run `refusal-sae run --study s --from saes`.")
    assert saes.mismatch({SCHEMA_VERSION_KEY: "3"}, "s").startswith("saes of study s was written with schema version 3")
    # lineage is no asset: its refusal re-runs the whole study, a command that exists.
    assert TABLES["lineage"].mismatch({}, "s").endswith("re-run `refusal-sae run --study s`.")
