-- One view per table, over every study's Parquet files. `{root}` is the warehouse root; the
-- hive partition folder model=<study> becomes the column `model`, next to each row's model_key.
CREATE VIEW prompts AS
    SELECT * FROM read_parquet('{root}/prompts/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW activations AS
    SELECT * FROM read_parquet('{root}/activations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW lineage AS
    SELECT * FROM read_parquet('{root}/lineage/model=*/*.parquet', hive_partitioning = true);
