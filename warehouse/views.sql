-- One view per table, over every study's Parquet files. `{root}` is the warehouse root; the
-- hive partition folder model=<study> becomes the column `model`, next to each row's model_key.
CREATE VIEW prompts AS
    SELECT * FROM read_parquet('{root}/prompts/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW activations AS
    SELECT * FROM read_parquet('{root}/activations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW lineage AS
    SELECT * FROM read_parquet('{root}/lineage/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW baseline_generations AS
    SELECT * FROM read_parquet('{root}/baseline_generations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW category_directions AS
    SELECT * FROM read_parquet('{root}/category_directions/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW saes AS
    SELECT * FROM read_parquet('{root}/saes/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW intervention_generations AS
    SELECT * FROM read_parquet('{root}/intervention_generations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW refusal_directions AS
    SELECT * FROM read_parquet('{root}/refusal_directions/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW intervention_effects AS
    SELECT * FROM read_parquet('{root}/intervention_effects/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW latent_attributions AS
    SELECT * FROM read_parquet('{root}/latent_attributions/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW feature_sets AS
    SELECT * FROM read_parquet('{root}/feature_sets/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW feature_cards AS
    SELECT * FROM read_parquet('{root}/feature_cards/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW feature_generations AS
    SELECT * FROM read_parquet('{root}/feature_generations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW feature_effects AS
    SELECT * FROM read_parquet('{root}/feature_effects/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW refusal_along_sequence AS
    SELECT * FROM read_parquet('{root}/refusal_along_sequence/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW feature_edges AS
    SELECT * FROM read_parquet('{root}/feature_edges/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW jailbreak_generations AS
    SELECT * FROM read_parquet('{root}/jailbreak_generations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW eval_activations AS
    SELECT * FROM read_parquet('{root}/eval_activations/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW jailbreak_analysis AS
    SELECT * FROM read_parquet('{root}/jailbreak_analysis/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW jailbreak_summary AS
    SELECT * FROM read_parquet('{root}/jailbreak_summary/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW refusal_probes AS
    SELECT * FROM read_parquet('{root}/refusal_probes/model=*/*.parquet', hive_partitioning = true);
CREATE VIEW latent_guard AS
    SELECT * FROM read_parquet('{root}/latent_guard/model=*/*.parquet', hive_partitioning = true);

-- Derived views, over the table views above.
CREATE VIEW direction_cosines AS
    SELECT a.model, a.name AS direction_a, b.name AS direction_b,
           list_cosine_similarity(a.direction, b.direction) AS cosine
    FROM category_directions a JOIN category_directions b USING (model)
    WHERE a.name < b.name;
