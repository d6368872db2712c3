-- Derived views, over the table views. `warehouse.query.connect` makes one view per table of the
-- catalogue (refusal_core.tables.TABLES) over every study's Parquet files; the hive partition
-- folder model=<study> becomes the column `model`, next to each row's model_key.
CREATE VIEW direction_cosines AS
    SELECT a.model, a.name AS direction_a, b.name AS direction_b,
           list_cosine_similarity(a.direction, b.direction) AS cosine
    FROM category_directions a JOIN category_directions b USING (model)
    WHERE a.name < b.name;

-- Refusal per method and eval set: the direction interventions and every feature set, random as the mean over its
-- seeded draws (not draw by draw); method_order sorts the methods as the paper's table does, rate_ci is the cell text.
CREATE VIEW method_effects AS
    SELECT *, CASE WHEN method = 'baseline' THEN 0 WHEN method LIKE 'direction %' THEN 1
                   WHEN method LIKE 'clamp %' THEN 2 ELSE 3 END AS method_order,
           format('{:.0f}% [{:.0f}, {:.0f}] n={}', 100 * refusal_rate, 100 * ci_low, 100 * ci_high, n_prompts) AS rate_ci
    FROM (
        SELECT model, eval_set, judge, n_prompts, refusal_rate, ci_low, ci_high, mean_refusal_score,
               difference, difference_ci_low, difference_ci_high, n_paired,
               CASE intervention_kind WHEN 'none' THEN 'baseline' WHEN 'ablate' THEN 'direction ablation'
                    WHEN 'add' THEN 'direction addition' ELSE intervention_kind END AS method
        FROM intervention_effects
        UNION ALL
        SELECT model, eval_set, judge, n_prompts, refusal_rate, ci_low, ci_high, mean_refusal_score,
               difference, difference_ci_low, difference_ci_high, n_paired,
               intervention_kind || ' ' || feature_set
                   || CASE WHEN contains(intervention_parameters, '"mean_of":') THEN ' (mean of draws)' ELSE '' END
        FROM feature_effects
        WHERE NOT contains(intervention_parameters, '"seed":')
    );
