-- Derived views, over the table views. `warehouse.query.connect` makes one view per table of the
-- catalogue (refusal_core.tables.TABLES) over every study's Parquet files; the hive partition
-- folder model=<study> becomes the column `model`, next to each row's model_key.
CREATE VIEW direction_cosines AS
    SELECT a.model, a.name AS direction_a, b.name AS direction_b,
           list_cosine_similarity(a.direction, b.direction) AS cosine
    FROM category_directions a JOIN category_directions b USING (model)
    WHERE a.name < b.name;
