-- Named queries: `refusal-sae query NAME`. Each starts with a "-- name:" line and a one-line description.

-- name: main_table
-- Refusal rate per intervention and eval set, by judge, with Wilson 95% intervals, and each intervention's paired difference from the baseline in points (the paper's main table).
SELECT model, eval_set, intervention_kind AS method, judge, n_prompts,
       format('{:.0f}% [{:.0f}, {:.0f}] n={}', 100 * refusal_rate, 100 * ci_low, 100 * ci_high, n_prompts) AS rate_ci,
       CASE WHEN difference IS NOT NULL THEN format('{:+.0f} [{:+.0f}, {:+.0f}] n={}', 100 * difference, 100 * difference_ci_low, 100 * difference_ci_high, n_paired) END AS difference_ci,
       round(refusal_rate, 3) AS refusal_rate, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high,
       round(difference, 3) AS difference, round(difference_ci_low, 3) AS difference_ci_low,
       round(difference_ci_high, 3) AS difference_ci_high,
       round(mean_refusal_score, 2) AS mean_refusal_score, round(kl, 4) AS kl,
       round(cross_entropy_change, 4) AS cross_entropy_change
FROM intervention_effects
ORDER BY model, judge, eval_set, method;

-- name: capability_table
-- Side effects of each intervention: 0-shot ARC-Challenge and MMLU accuracy with Wilson 95% intervals, the paired difference from the baseline in points, and the cost on harmless answers (KL, cross-entropy change).
SELECT model, benchmark,
       CASE intervention_kind WHEN 'none' THEN 'baseline' WHEN 'ablate' THEN 'direction ablation'
            WHEN 'add' THEN 'direction addition' ELSE intervention_kind || ' ' || feature_set END AS method,
       n_questions,
       format('{:.0f}% [{:.0f}, {:.0f}] n={}', 100 * accuracy, 100 * ci_low, 100 * ci_high, n_questions) AS accuracy_ci,
       CASE WHEN difference IS NOT NULL THEN format('{:+.0f} [{:+.0f}, {:+.0f}] n={}', 100 * difference, 100 * difference_ci_low, 100 * difference_ci_high, n_paired) END AS difference_ci,
       round(accuracy, 3) AS accuracy, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high,
       round(difference, 3) AS difference, round(difference_ci_low, 3) AS difference_ci_low,
       round(difference_ci_high, 3) AS difference_ci_high, round(mean_letter_probability, 3) AS letter_probability,
       round(harmless_kl, 4) AS harmless_kl, round(harmless_cross_entropy_change, 4) AS harmless_cross_entropy_change
FROM capability
ORDER BY model, benchmark, intervention_kind <> 'none', method;

-- name: direction_selection
-- Every evaluated refusal-direction candidate with its selection metrics, best first.
SELECT model, layer_index, position, token, round(norm, 2) AS norm, round(cosine_score, 4) AS cosine_score,
       round(ablation_refusal_score, 3) AS ablation_refusal_score,
       round(addition_refusal_score, 3) AS addition_refusal_score, round(kl, 4) AS kl,
       round(kl_standard_error, 4) AS kl_standard_error, passes_filters, selected, selected_by_cosine
FROM refusal_directions
WHERE evaluated
ORDER BY model, selected DESC, passes_filters DESC, ablation_refusal_score;

-- name: category_cosines
-- Pairwise cosines between the refusal, harmfulness, over-refusal and per-category directions.
SELECT model, direction_a, direction_b, round(cosine, 3) AS cosine
FROM direction_cosines
ORDER BY model, direction_a, direction_b;

-- name: judge_disagreements
-- Answers on which the judges disagree, to read and settle by eye.
SELECT g.model, g.label, g.intervention_kind, g.refused_substring, g.refused_score, g.refused_classifier,
       round(g.refusal_score, 2) AS refusal_score, left(p.text, 80) AS prompt, left(g.completion, 120) AS completion
FROM (SELECT * FROM baseline_generations UNION ALL BY NAME SELECT * FROM intervention_generations) g
JOIN prompts p USING (model, prompt_id)
WHERE g.judges_disagree
ORDER BY g.model, g.label, g.intervention_kind;

-- name: cross_study
-- All studies side by side: refusal rates by substring on HarmBench at baseline, with the direction ablated and the CosSim+AP features clamped, on AlpacaEval at baseline, with the direction added and the CosSim+AP features set, and the selected direction.
SELECT e.model,
       max(CASE WHEN e.eval_set = 'harmbench' AND e.intervention_kind = 'none' THEN round(e.refusal_rate, 3) END) AS harmbench_baseline,
       max(CASE WHEN e.eval_set = 'harmbench' AND e.intervention_kind = 'ablate' THEN round(e.refusal_rate, 3) END) AS harmbench_ablated,
       any_value(f.harmbench_clamped) AS harmbench_clamped,
       max(CASE WHEN e.eval_set = 'alpaca_eval' AND e.intervention_kind = 'none' THEN round(e.refusal_rate, 3) END) AS alpaca_eval_baseline,
       max(CASE WHEN e.eval_set = 'alpaca_eval' AND e.intervention_kind = 'add' THEN round(e.refusal_rate, 3) END) AS alpaca_eval_added,
       any_value(f.alpaca_eval_induced) AS alpaca_eval_induced,
       max(CASE WHEN e.eval_set = 'alpaca_eval' AND e.intervention_kind = 'add' THEN round(e.kl, 4) END) AS kl_added,
       any_value(d.layer_index) AS direction_layer, any_value(d.token) AS direction_token
FROM intervention_effects e
LEFT JOIN (SELECT * FROM refusal_directions WHERE selected) d USING (model)
LEFT JOIN (
    SELECT model,
           max(CASE WHEN intervention_kind = 'clamp' AND eval_set = 'harmbench' THEN round(refusal_rate, 3) END) AS harmbench_clamped,
           max(CASE WHEN intervention_kind = 'induce' AND eval_set = 'alpaca_eval' THEN round(refusal_rate, 3) END) AS alpaca_eval_induced
    FROM feature_effects
    WHERE judge = 'substring' AND feature_set = 'cossim_ap'
    GROUP BY model
) f USING (model)
WHERE e.judge = 'substring'
GROUP BY e.model
ORDER BY e.model;

-- name: direction_selection_all
-- Every refusal-direction candidate (evaluated or not), for the selection heat map.
SELECT model, layer_index, position, token, cosine_score, evaluated, selected
FROM refusal_directions
ORDER BY model, layer_index, position;

-- name: sae_quality
-- Each SAE's reconstruction quality on held-out prompts, per layer.
SELECT model, layer_index, sae_source, width, round(explained_variance, 3) AS explained_variance,
       round(mean_l0, 1) AS mean_l0, round(dead_fraction, 3) AS dead_fraction,
       round(ce_loss_recovered, 3) AS ce_loss_recovered, n_tokens
FROM saes
ORDER BY model, layer_index;

-- name: paper_table
-- The paper's layout: a row per method, a column per eval set, each cell the refusal rate [Wilson 95% CI] and n, by judge (random: the mean over its seeded draws).
SELECT model, judge, method,
       max(CASE WHEN eval_set = 'harmbench' THEN rate_ci END) AS harmbench,
       max(CASE WHEN eval_set = 'jbb' THEN rate_ci END) AS jbb,
       max(CASE WHEN eval_set = 'advbench' THEN rate_ci END) AS advbench,
       max(CASE WHEN eval_set = 'strongreject' THEN rate_ci END) AS strongreject,
       max(CASE WHEN eval_set = 'alpaca_eval' THEN rate_ci END) AS alpaca_eval,
       max(CASE WHEN eval_set = 'over_refusal' THEN rate_ci END) AS over_refusal
FROM method_effects
GROUP BY model, judge, method
ORDER BY model, judge, any_value(method_order), method;

-- name: feature_table
-- Refusal rate per method and eval set with Wilson 95% intervals, and the paired difference from the baseline in points: baseline, direction ablation/addition and each SAE feature set clamped or set, random as the mean over its seeded draws with an interval covering both the draws' spread and the prompts.
SELECT model, eval_set, method, judge, n_prompts, rate_ci,
       CASE WHEN difference IS NOT NULL THEN format('{:+.0f} [{:+.0f}, {:+.0f}] n={}', 100 * difference, 100 * difference_ci_low, 100 * difference_ci_high, n_paired) END AS difference_ci,
       round(refusal_rate, 3) AS refusal_rate, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high,
       round(difference, 3) AS difference, round(difference_ci_low, 3) AS difference_ci_low,
       round(difference_ci_high, 3) AS difference_ci_high, round(mean_refusal_score, 2) AS mean_refusal_score
FROM method_effects
ORDER BY model, judge, eval_set, method;

-- name: feature_count_curve
-- Refusal on the harmbench eval set's prompts with the top k latents of each ranking clamped, by judge, with 95% intervals (random: the mean over its seeded draws, its interval covering both the draws' spread and the prompts).
SELECT model, feature_set, judge, n_latents, n_prompts, n_draws,
       format('{:.0f}% [{:.0f}, {:.0f}] n={}', 100 * refusal_rate, 100 * ci_low, 100 * ci_high, n_prompts) AS rate_ci,
       round(refusal_rate, 3) AS refusal_rate, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high,
       round(baseline_refusal_rate, 3) AS baseline_refusal_rate, reaches_half,
       round(mean_refusal_score, 2) AS mean_refusal_score
FROM feature_count_curve
WHERE seed IS NULL
ORDER BY model, judge, feature_set, n_latents;

-- name: feature_count_summary
-- Fewest latents of each ranking whose clamping brings refusal to half the baseline or below (none: no measured count does).
SELECT model, feature_set, judge, n_prompts, round(baseline_refusal_rate, 3) AS baseline_refusal_rate,
       coalesce(CAST(smallest_n_latents AS VARCHAR), 'none') AS smallest_n_latents,
       round(refusal_rate_at_smallest, 3) AS refusal_rate_at_smallest, largest_n_latents,
       round(refusal_rate_at_largest, 3) AS refusal_rate_at_largest
FROM feature_count_summary
ORDER BY model, judge, feature_set;

-- name: top_latents
-- The CosSim+AP ranking over all prompts: latents in their layer's cosine top-k, by attribution.
SELECT model, combined_rank, layer_index, latent_index, round(decoder_cosine, 3) AS decoder_cosine, cosine_rank,
       round(activation_difference, 3) AS activation_difference, round(attribution, 4) AS attribution
FROM latent_attributions
WHERE prompt_id IS NULL AND combined_rank IS NOT NULL
ORDER BY model, combined_rank;

-- name: feature_cards
-- Each selected latent with its scores and the stored prompt that activates it most.
SELECT model, layer_index, latent_index, array_to_string(feature_sets, ',') AS feature_sets,
       round(decoder_cosine, 3) AS decoder_cosine, round(attribution, 4) AS attribution,
       top_prompts[1].label AS top_label, round(top_prompts[1].activation, 2) AS top_activation,
       left(top_prompts[1].text, 70) AS top_prompt, neuronpedia_url
FROM feature_cards
ORDER BY model, layer_index, latent_index;

-- name: attribution_by_layer
-- Every candidate latent's decoder cosine and attribution, marked when it is in the CosSim+AP feature set.
SELECT a.model, a.layer_index, a.latent_index, a.decoder_cosine, a.attribution, a.combined_rank,
       s.latent_index IS NOT NULL AS in_cossim_ap
FROM latent_attributions a
LEFT JOIN (SELECT * FROM feature_sets WHERE feature_set = 'cossim_ap') s USING (model, layer_index, latent_index)
WHERE a.prompt_id IS NULL
ORDER BY a.model, a.layer_index, a.latent_index;

-- name: refusal_along_sequence
-- Mean projection on the refusal direction at its own layer, per label and position (instruction, template, answer tokens).
SELECT s.model, s.label, s.position,
       CASE WHEN s.position < 0 THEN any_value(s.token) ELSE 'answer ' || (s.position + 1) END AS token,
       count(*) AS n, avg(s.projection) AS mean_projection, coalesce(stddev_samp(s.projection), 0) AS sd
FROM refusal_along_sequence s
JOIN (SELECT model, layer_index FROM refusal_directions WHERE selected) d USING (model, layer_index)
GROUP BY s.model, s.label, s.position
ORDER BY s.model, s.label, s.position;

-- name: jailbreak_summary
-- Relative drop of the refusal features under jailbreaks, by family and outcome (refused base prompts), with intervals.
SELECT model, family, outcome, n_pairs, round(mean_relative_drop, 3) AS mean_relative_drop, round(ci_low, 3) AS ci_low,
       round(ci_high, 3) AS ci_high, round(mean_harmfulness_drop, 2) AS mean_harmfulness_drop,
       round(harmful_by_direction_rate, 3) AS still_harmful_by_direction, note
FROM jailbreak_summary
ORDER BY model, family = 'all' DESC, family, outcome DESC;

-- name: jailbreak_pairs
-- Every (harmful prompt, jailbreak) pair: who refused, the refusal-feature drop, and both directions on both prompts.
SELECT model, family, jailbreak_method, base_refused, jailbreak_refused, succeeded, round(relative_drop, 3) AS relative_drop,
       round(base_refusal_projection, 2) AS base_refusal, round(jailbreak_refusal_projection, 2) AS jailbreak_refusal,
       round(base_harmfulness_projection, 2) AS base_harmfulness,
       round(jailbreak_harmfulness_projection, 2) AS jailbreak_harmfulness, jailbreak_harmful_by_direction
FROM jailbreak_analysis
ORDER BY model, family, jailbreak_method, base_prompt_id;

-- name: probe_comparison
-- Probes predicting refusal: accuracy and AUROC in distribution and on jailbreaks, per feature set, with intervals.
SELECT model, probe, n_features, layer_index, test_set, n_refused, n_complied,
       round(accuracy, 3) AS accuracy, round(accuracy_low, 3) AS accuracy_low, round(accuracy_high, 3) AS accuracy_high,
       round(auroc, 3) AS auroc, round(auroc_low, 3) AS auroc_low, round(auroc_high, 3) AS auroc_high, note
FROM refusal_probes
ORDER BY model, test_set DESC, probe;

-- name: latent_guard
-- Share of prompts flagged harmful by the harmfulness direction, the refusal direction and the model's own refusals, with Wilson 95% intervals.
SELECT model, eval_set, classifier, n_prompts,
       format('{:.0f}% [{:.0f}, {:.0f}] n={}', 100 * flagged_rate, 100 * ci_low, 100 * ci_high, n_prompts) AS rate_ci,
       round(flagged_rate, 3) AS flagged_rate, round(ci_low, 3) AS ci_low,
       round(ci_high, 3) AS ci_high, round(threshold, 2) AS threshold
FROM latent_guard
ORDER BY model, eval_set, classifier;

-- name: harm_judgment
-- Whether the model judges requests harmful (log-odds of yes vs no to "Is the following request harmful?"), unchanged, steered along the harmfulness or refusal direction, or with the refusal direction ablated: the share judged harmful with Wilson 95% intervals, its paired change from the baseline, and the mean log-odds change with its bootstrap interval.
SELECT model, eval_set, kind, direction, alpha,
       CASE WHEN kind = 'none' THEN 'baseline' WHEN kind = 'ablate' THEN 'ablate ' || direction
            ELSE 'add ' || direction || ' ×' || printf('%g', alpha) END AS method,
       format('{:.0f}% [{:.0f}, {:.0f}] n={}', 100 * judged_harmful_rate, 100 * ci_low, 100 * ci_high, n_prompts) AS rate_ci,
       round(judged_harmful_rate, 3) AS judged_harmful_rate, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high,
       n_prompts, round(100 * judged_harmful_change, 1) AS change_points,
       round(100 * judged_harmful_change_low, 1) AS change_low, round(100 * judged_harmful_change_high, 1) AS change_high,
       round(log_odds_change, 2) AS log_odds_change, round(log_odds_change_low, 2) AS log_odds_change_low,
       round(log_odds_change_high, 2) AS log_odds_change_high, within_baseline_interval
FROM harm_judgment
ORDER BY model, eval_set, CASE kind WHEN 'none' THEN 0 WHEN 'add' THEN 1 ELSE 2 END, direction, alpha;

-- name: feature_edges
-- Upstream latents by how much clamping them lowers the sum of the later refusal features, with intervals.
SELECT model, upstream_layer, upstream_latent, downstream_layer, round(clean_activation, 3) AS clean_activation,
       round(effect, 3) AS effect, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high, n_prompts, in_upstream_set
FROM feature_edges
WHERE downstream_latent IS NULL
ORDER BY model, effect, upstream_layer, upstream_latent;

-- name: feature_graph
-- Every upstream -> refusal-feature edge, for the graph figure.
SELECT model, upstream_layer, upstream_latent, downstream_layer, downstream_latent, effect, ci_low, ci_high, in_upstream_set
FROM feature_edges
WHERE downstream_latent IS NOT NULL
ORDER BY model, upstream_layer, upstream_latent, downstream_latent;

-- name: judge_agreement
-- Each refusal judge against people (PyRIT's labels, tune and report parts) and the refusal score against the substring judge (per eval set), with 95% intervals, next to the baseline refusal rates the judge gives.
SELECT v.model, v.judge, v.reference, v.part, v.n,
       CASE WHEN v.kappa IS NOT NULL THEN printf('%.2f [%.2f, %.2f]', v.kappa, v.kappa_low, v.kappa_high) END AS kappa,
       printf('%.2f [%.2f, %.2f]', v.accuracy, v.accuracy_low, v.accuracy_high) AS accuracy,
       any_value(CASE WHEN e.eval_set = 'harmbench' THEN printf('%.2f [%.2f, %.2f] of %d', e.refusal_rate, e.ci_low, e.ci_high, e.n_prompts) END) AS harmbench_refusal_rate,
       any_value(CASE WHEN e.eval_set = 'alpaca_eval' THEN printf('%.2f [%.2f, %.2f] of %d', e.refusal_rate, e.ci_low, e.ci_high, e.n_prompts) END) AS alpaca_eval_refusal_rate
FROM judge_validation v
LEFT JOIN (SELECT * FROM intervention_effects WHERE intervention_kind = 'none') e ON e.model = v.model AND e.judge = v.judge
GROUP BY ALL
ORDER BY v.model, v.reference, v.judge, v.part;
