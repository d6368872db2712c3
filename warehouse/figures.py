"""Figures drawn from named-query results (lists of row dicts), saved as print-quality PNGs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refusal_core.prompts import EVAL_SETS, HARMLESS_SET  # noqa: E402
from refusal_core.storage import Location, write_atomically  # noqa: E402

DPI = 200


def refusal_by_intervention(rows: list[dict], study: str):
    """Grouped bars: refusal rate per eval set and direction intervention (substring judge), with 95% intervals."""
    return _rate_bars(rows, f"Refusal by intervention, {study}")


def feature_clamping(rows: list[dict], study: str):
    """Grouped bars: refusal rate per eval set and method, SAE feature sets beside the direction (the paper's main table), on
    the sets where every feature set is measured: the harmful sets where some set besides CosSim+AP was clamped, and
    alpaca_eval."""
    clamps = Counter(r["eval_set"] for r in rows if r["method"].startswith("clamp ") and r["judge"] == "substring")
    compared = {name for name, count in clamps.items() if count > 1} | {HARMLESS_SET}
    return _rate_bars([r for r in rows if r["eval_set"] in compared], f"Clamping SAE feature sets, {study}",
                      figsize=(8.4, 4.2))


def capability_by_intervention(rows: list[dict], study: str):
    """Side effects: accuracy per benchmark and intervention with 95% intervals (chance dotted), and the change in
    cross-entropy of the baseline's own harmless answers under each intervention."""
    benchmarks = sorted({r["benchmark"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.85 / len(methods)
    for i, benchmark in enumerate(benchmarks):
        found = [r for r in rows if r["benchmark"] == benchmark]
        for k, r in enumerate(sorted(found, key=lambda r: methods.index(r["method"]))):
            x = i - width * (len(found) - 1) / 2 + k * width
            error = [[r["accuracy"] - r["ci_low"]], [r["ci_high"] - r["accuracy"]]]
            left.bar(x, r["accuracy"], width * 0.92, yerr=error, capsize=2, color=colours[r["method"]],
                     label=r["method"] if i == 0 else None)
            left.text(x, r["ci_high"] + 0.02, f"{r['accuracy']:.0%}", ha="center", va="bottom", fontsize=6)
    left.axhline(0.25, color="0.6", linestyle=":", linewidth=0.8)
    left.set_xticks(range(len(benchmarks)), benchmarks)
    left.set_ylim(0, 1.12)
    left.set_ylabel("accuracy (0-shot, answer letter)")
    left.legend(title="method", frameon=False, fontsize=7)
    costs = {r["method"]: r["harmless_cross_entropy_change"] for r in rows}
    shown = [m for m in methods if costs[m] is not None]
    right.barh(range(len(shown)), [costs[m] for m in shown], color=[colours[m] for m in shown])
    right.set_yticks(range(len(shown)), shown, fontsize=7)
    right.invert_yaxis()
    right.axvline(0, color="0.6", linewidth=0.8)
    right.set_xlabel("cross-entropy change on harmless answers\n(nats/token)")
    figure.suptitle(f"Side effects of the interventions, {study}\n(95% Wilson score intervals; dotted: chance on 4 choices)",
                    fontsize=10)
    return figure


def harm_judgment(rows: list[dict], study: str):
    """Grouped bars: share of instructions the model judges harmful per eval set and condition, with 95% intervals; the
    baseline's interval shaded, so steering that moves the judgment leaves the band."""
    sets = list(dict.fromkeys(r["eval_set"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axis = plt.subplots(figsize=(7.2, 3.8))
    width = 0.85 / len(methods)
    for i, name in enumerate(sets):
        found = {r["method"]: r for r in rows if r["eval_set"] == name}
        base = found.get("baseline")
        if base:
            axis.axhspan(base["ci_low"], base["ci_high"], xmin=(i + 0.04) / len(sets), xmax=(i + 0.96) / len(sets),
                         color="0.9", zorder=0)
        for k, method in enumerate(methods):
            if method not in found:
                continue
            r, x = found[method], i - 0.425 + (k + 0.5) * width
            axis.bar(x, r["judged_harmful_rate"], width * 0.92, color=f"C{k % 10}", label=method if i == 0 else None,
                     yerr=[[r["judged_harmful_rate"] - r["ci_low"]], [r["ci_high"] - r["judged_harmful_rate"]]], capsize=2)
    axis.set_xlim(-0.5, len(sets) - 0.5)
    axis.set_xticks(range(len(sets)), sets)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("judged harmful (log-odds yes/no > 0)")
    axis.legend(title="condition", frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    axis.set_title(f"Does steering change the harm judgment? {study}\n(95% Wilson intervals; grey: the baseline's)",
                   fontsize=10)
    return figure


def feature_count_curve(rows: list[dict], study: str):
    """Refusal (refusal score > 0) against the number of latents clamped, a line per ranking with its 95% interval as a
    band (random: the mean over its draws, its interval covering both the draws' spread and the prompts), and half the baseline as a dashed line."""
    scored = [r for r in rows if r["judge"] == "refusal_score"]
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    labels = {"cossim_ap": "CosSim+AP", "cosine": "cosine", "activation_difference": "activation difference",
              "attribution": "attribution", "random": "random (mean of draws)"}
    for index, name in enumerate(labels):
        members = sorted((r for r in scored if r["feature_set"] == name), key=lambda r: r["n_latents"])
        if not members:
            continue
        counts = [r["n_latents"] for r in members]
        colour = "0.4" if name == "random" else f"C{index}"
        axis.plot(counts, [r["refusal_rate"] for r in members], marker="o", markersize=3, color=colour,
                  linestyle="--" if name == "random" else "-", label=labels[name])
        axis.fill_between(counts, [r["ci_low"] for r in members], [r["ci_high"] for r in members], color=colour,
                          alpha=0.25 if name == "random" else 0.08)
    if scored:
        axis.axhline(scored[0]["baseline_refusal_rate"] / 2, color="C3", linestyle=":", linewidth=1, label="half the baseline")
    axis.set_xscale("log")
    counts = sorted({r["n_latents"] for r in scored})
    axis.set_xticks(counts, [str(k) for k in counts])
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("latents clamped (top k of each ranking)")
    axis.set_ylabel("refusal (refusal score > 0)")
    axis.legend(frameon=False, fontsize=7)
    axis.set_title(f"Refusal against the number of latents clamped, HarmBench test, {study}", fontsize=9)
    return figure


def attribution_by_layer(rows: list[dict], study: str):
    """Scatter per layer of the candidate latents: decoder cosine with the refusal direction against attribution."""
    layers = sorted({r["layer_index"] for r in rows})
    figure, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.4), sharey=True, squeeze=False)
    for axis, layer in zip(axes[0], layers):
        members = [r for r in rows if r["layer_index"] == layer]
        chosen = [r for r in members if r["in_cossim_ap"]]
        axis.scatter([r["decoder_cosine"] for r in members], [r["attribution"] for r in members], s=8, color="0.6",
                     label="candidate")
        axis.scatter([r["decoder_cosine"] for r in chosen], [r["attribution"] for r in chosen], s=24, color="C3",
                     marker="*", label="CosSim+AP set")
        axis.axhline(0, color="0.8", linewidth=0.8)
        axis.set_title(f"layer {layer}", fontsize=9)
        axis.set_xlabel("decoder cosine with refusal direction")
    axes[0][0].set_ylabel("attribution (IG, mean over prompts)")
    axes[0][0].legend(frameon=False, fontsize=7)
    figure.suptitle(f"Latent attribution by layer, {study}", fontsize=10)
    return figure


def refusal_along_sequence(rows: list[dict], study: str):
    """Mean projection on the refusal direction per position, one line per label, with 95% intervals of the mean."""
    figure, axis = plt.subplots(figsize=(7.2, 3.6))
    positions = sorted({r["position"] for r in rows})
    for label in sorted({r["label"] for r in rows}):
        found = {r["position"]: r for r in rows if r["label"] == label}
        xs = [positions.index(p) for p in positions if p in found]
        mean = np.array([found[p]["mean_projection"] for p in positions if p in found])
        half = np.array([1.96 * found[p]["sd"] / np.sqrt(found[p]["n"]) for p in positions if p in found])
        axis.plot(xs, mean, marker="o", markersize=3, label=label)
        axis.fill_between(xs, mean - half, mean + half, alpha=0.2)
    tokens = {r["position"]: r["token"] for r in rows}
    axis.set_xticks(range(len(positions)), [_readable(tokens[p]).strip("'") if p < 0 else tokens[p] for p in positions],
                    rotation=60, ha="right", fontsize=7)
    axis.axvline(positions.index(0) - 0.5 if 0 in positions else len(positions) - 0.5, color="0.6", linestyle="--",
                 linewidth=0.8)
    axis.set_xlabel("position (prompt | answer)")
    axis.set_ylabel("projection on refusal direction")
    axis.set_title(f"Refusal along the sequence at the direction's layer, {study}", fontsize=10)
    axis.legend(frameon=False, fontsize=8)
    return figure


CROSS_STUDY_COLUMNS = ("harmbench_baseline", "harmbench_ablated", "harmbench_clamped", "alpaca_eval_baseline",
                       "alpaca_eval_added", "alpaca_eval_induced")


def cross_study(rows: list[dict]):
    """Grouped bars over every study: refusal at baseline and under each intervention (rows of the cross_study query)."""
    figure, axis = plt.subplots(figsize=(7.2, 1.6 + 0.5 * len(rows)))
    height = 0.8 / len(CROSS_STUDY_COLUMNS)
    for k, column in enumerate(CROSS_STUDY_COLUMNS):
        values = [r[column] if r[column] is not None else np.nan for r in rows]
        y = [i + k * height for i in range(len(rows))]
        axis.barh(y, values, height, label=column.replace("_", " "))
        for position, value in zip(y, values):  # label every bar, so a 0% bar and a missing one differ
            axis.text(0.005 if np.isnan(value) else value + 0.005, position, "n/a" if np.isnan(value) else f"{value:.0%}",
                      va="center", fontsize=6)
    axis.set_yticks([i + height * (len(CROSS_STUDY_COLUMNS) - 1) / 2 for i in range(len(rows))],
                    [r["model"] for r in rows], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.08)
    axis.set_xlabel("refusal rate (substring judge)")
    axis.set_title("All studies: refusal at baseline and under the interventions", fontsize=10)
    axis.legend(frameon=False, fontsize=7, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    return figure


def _rate_bars(rows: list[dict], title: str, figsize: tuple[float, float] = (6.4, 3.8)):
    """Per eval set, one bar per method measured there (consistent colours), each labelled with its rate."""
    rows = [r for r in rows if r["judge"] == "substring"]
    sets = sorted({r["eval_set"] for r in rows}, key=lambda s: (EVAL_SETS.index(s) if s in EVAL_SETS else len(EVAL_SETS), s))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m not in ("none", "baseline"), m))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    figure, axis = plt.subplots(figsize=figsize)
    widest = max(sum(1 for r in rows if r["eval_set"] == s) for s in sets)
    width = 0.85 / widest
    centres, labelled = [], set()
    for i, eval_set in enumerate(sets):
        found = sorted((r for r in rows if r["eval_set"] == eval_set), key=lambda r: methods.index(r["method"]))
        start = i - width * (len(found) - 1) / 2
        centres.append(i)
        for k, r in enumerate(found):
            x = start + k * width
            error = [[r["refusal_rate"] - r["ci_low"]], [r["ci_high"] - r["refusal_rate"]]]
            axis.bar(x, r["refusal_rate"], width * 0.92, yerr=error, capsize=2, color=colours[r["method"]],
                     label=None if r["method"] in labelled else r["method"])
            labelled.add(r["method"])
            axis.text(x, r["ci_high"] + 0.02, f"{r['refusal_rate']:.0%}", ha="center", va="bottom", fontsize=6)
    axis.set_xticks(centres, sets)
    axis.set_ylim(0, 1.12)
    axis.set_ylabel("refusal rate (substring judge)")
    axis.set_xlabel("eval set")
    axis.set_title(f"{title}\n(95% Wilson score intervals)", fontsize=10)
    axis.legend(title="method", frameon=False, fontsize=7, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    return figure


def direction_selection(rows: list[dict], study: str):
    """Heat map of the output-free cosine score over layer x position, evaluated candidates marked."""
    layers = sorted({r["layer_index"] for r in rows})
    positions = sorted({r["position"] for r in rows})
    grid = np.full((len(positions), len(layers)), np.nan)
    for r in rows:
        grid[positions.index(r["position"]), layers.index(r["layer_index"])] = r["cosine_score"]
    figure, axis = plt.subplots(figsize=(7.2, 3.2))
    image = axis.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    figure.colorbar(image, ax=axis, label="cosine score")
    tokens = {r["position"]: r["token"] for r in rows}
    axis.set_yticks(range(len(positions)), [f"{p} {_readable(tokens[p])}" for p in positions])
    axis.set_xticks(range(len(layers)), layers, fontsize=7)
    for r in rows:
        if r["evaluated"]:
            marker = "*" if r["selected"] else "o"
            axis.plot(layers.index(r["layer_index"]), positions.index(r["position"]), marker,
                      color="red" if r["selected"] else "white", markersize=10 if r["selected"] else 4)
    axis.set_xlabel("layer")
    axis.set_ylabel("position (token)")
    axis.set_title(f"Refusal-direction candidates, {study} (o evaluated, * selected)")
    return figure


def category_cosines(rows: list[dict], study: str):
    """Matrix of pairwise cosines between the study's directions."""
    names = sorted({r["direction_a"] for r in rows} | {r["direction_b"] for r in rows})
    matrix = np.eye(len(names))
    for r in rows:
        i, j = names.index(r["direction_a"]), names.index(r["direction_b"])
        matrix[i, j] = matrix[j, i] = r["cosine"]
    figure, axis = plt.subplots(figsize=(1.2 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    image = axis.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    figure.colorbar(image, ax=axis, label="cosine")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
    axis.set_title(f"Direction cosines, {study}")
    return figure


def jailbreak_drop(rows: list[dict], study: str):
    """Bars per jailbreak family: mean relative drop of the refusal features for succeeded vs failed jailbreaks, with intervals."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    figure, axis = plt.subplots(figsize=(2.4 + 1.3 * len(families), 3.8))
    width, labelled = 0.38, set()
    for k, outcome in enumerate(("succeeded", "failed")):
        for i, family in enumerate(families):
            row = next((r for r in rows if r["family"] == family and r["outcome"] == outcome), None)
            x = i + (k - 0.5) * width
            if row is None or row["mean_relative_drop"] is None:
                axis.text(x, 0.02, f"n={row['n_pairs'] if row else 0}\ntoo few", ha="center", va="bottom", fontsize=6)
                continue
            mean = row["mean_relative_drop"]
            axis.bar(x, mean, width * 0.92, yerr=[[mean - row["ci_low"]], [row["ci_high"] - mean]], capsize=2,
                     color="C3" if outcome == "succeeded" else "C0", label=None if outcome in labelled else outcome)
            labelled.add(outcome)
            axis.text(x, max(row["ci_high"], 0) + 0.02, f"n={row['n_pairs']}", ha="center", va="bottom", fontsize=6)
    axis.axhline(0, color="0.6", linewidth=0.8)
    axis.set_xticks(range(len(families)), families)
    axis.set_xlabel("jailbreak family")
    axis.set_ylabel("relative drop of refusal-feature activation")
    axis.margins(y=0.15)
    axis.set_title(f"Refusal-feature drop under jailbreaks, {study}\n(pairs whose base prompt is refused; 95% bootstrap intervals)",
                   fontsize=9)
    if labelled:
        axis.legend(title="jailbreak", frameon=False, fontsize=7)
    return figure


PROBE_ORDER = ("refusal_features", "dense_residual", "random_latents", "refusal_direction", "harmfulness_direction")


def probe_comparison(rows: list[dict], study: str):
    """Accuracy and AUROC of each probe in distribution and on jailbreaks, with intervals over bootstrap seeds."""
    probes = [p for p in PROBE_ORDER if any(r["probe"] == p for r in rows)]
    figure, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), sharey=True)
    width, labelled = 0.38, set()
    for axis, metric in zip(axes, ("accuracy", "auroc")):
        for k, test_set in enumerate(("in_distribution", "jailbreak")):
            for i, probe in enumerate(probes):
                row = next((r for r in rows if r["probe"] == probe and r["test_set"] == test_set), None)
                x = i + (k - 0.5) * width
                if row is None or row[metric] is None:
                    axis.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                    continue
                value = row[metric]
                # The point is the probe fitted on every train row; the interval comes from refits on resamples,
                # so the point can sit just outside it.
                error = [[max(0.0, value - row[f"{metric}_low"])], [max(0.0, row[f"{metric}_high"] - value)]]
                axis.bar(x, value, width * 0.92, yerr=error,
                         capsize=2, color=f"C{k}", label=None if test_set in labelled else test_set.replace("_", " "))
                labelled.add(test_set)
                axis.text(x, max(value, row[f"{metric}_high"]) + 0.02, f"{value:.2f}", ha="center", va="bottom", fontsize=6)
        axis.axhline(0.5, color="0.6", linestyle="--", linewidth=0.8)
        axis.set_xticks(range(len(probes)), [p.replace("_", "\n") for p in probes], fontsize=7)
        axis.set_ylim(0, 1.12)
        axis.set_ylabel(metric if metric == "accuracy" else "AUROC")
        axis.set_xlabel("probe input")
    if labelled:
        axes[0].legend(title="test set", frameon=False, fontsize=7)
    figure.suptitle(f"Probes predicting refusal, {study} (95% intervals over bootstrap seeds)", fontsize=10)
    return figure


def feature_graph(rows: list[dict], study: str):
    """Upstream latents (left) to refusal features (right); edge colour and width show the relative change clamping causes."""
    upstream = sorted({(r["upstream_layer"], r["upstream_latent"]) for r in rows})
    downstream = sorted({(r["downstream_layer"], r["downstream_latent"]) for r in rows})
    figure, axis = plt.subplots(figsize=(6.4, 1.6 + 0.22 * max(len(upstream), len(downstream))))
    y_up = {key: 1 - i / max(1, len(upstream) - 1) for i, key in enumerate(upstream)}
    y_down = {key: 1 - i / max(1, len(downstream) - 1) for i, key in enumerate(downstream)}
    colours = plt.get_cmap("RdBu_r")
    for r in rows:
        if r["effect"] is None:
            continue
        significant = r["ci_high"] is not None and (r["ci_high"] < 0 or r["ci_low"] > 0)
        effect = max(-1.0, min(1.0, r["effect"]))
        axis.plot([0, 1], [y_up[(r["upstream_layer"], r["upstream_latent"])], y_down[(r["downstream_layer"], r["downstream_latent"])]],
                  color=colours((effect + 1) / 2), linewidth=0.4 + 3 * abs(effect), alpha=0.9 if significant else 0.15)
    in_set = {(r["upstream_layer"], r["upstream_latent"]) for r in rows if r["in_upstream_set"]}
    for key, y in y_up.items():
        axis.text(-0.02, y, f"L{key[0]}/{key[1]}", ha="right", va="center", fontsize=6,
                  fontweight="bold" if key in in_set else "normal")
    for key, y in y_down.items():
        axis.text(1.02, y, f"L{key[0]}/{key[1]}", ha="left", va="center", fontsize=6)
    axis.scatter([0] * len(y_up), list(y_up.values()), s=10, color=["C3" if k in in_set else "0.4" for k in y_up], zorder=3)
    axis.scatter([1] * len(y_down), list(y_down.values()), s=10, color="0.2", zorder=3)
    axis.set_xlim(-0.35, 1.35)
    axis.set_xticks([0, 1], ["upstream latent (clamped)", "refusal feature"])
    axis.set_yticks([])
    for side in ("left", "right", "top"):
        axis.spines[side].set_visible(False)
    image = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(-1, 1))
    figure.colorbar(image, ax=axis, label="relative change of the refusal feature", fraction=0.04)
    axis.set_title(f"Upstream -> refusal features, {study}\n(bold/red: the upstream set; faint: interval includes 0)", fontsize=9)
    return figure


def _readable(token: str) -> str:
    """A byte-level BPE token as a person reads it: newline and space markers spelled out."""
    return repr(token.replace("Ċ", "\n").replace("Ġ", " "))


def peak_histogram(harmful: list[float], harmless: list[float], title: str):
    """A latent's peak activation on each stored harmful and harmless prompt, as two overlaid histograms."""
    figure, axis = plt.subplots(figsize=(5.2, 2.6))
    values = [v for v in harmful + harmless] or [0.0]
    bins = np.linspace(min(values), max(values) if max(values) > min(values) else min(values) + 1, 25)
    for label, data, colour in (("harmful", harmful, "#c0392b"), ("harmless", harmless, "#2e86c1")):
        axis.hist(data, bins=bins, alpha=0.6, color=colour, label=f"{label} (n = {len(data)})")
    axis.set_xlabel("peak activation over the post-instruction tokens")
    axis.set_ylabel("prompts")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes (for a page that inlines it), closed afterwards."""
    import io

    figure.tight_layout()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, dpi=DPI // 2, format="png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


FIGURES: dict[str, tuple[str, Callable]] = {
    "refusal_by_intervention": ("main_table", refusal_by_intervention),
    "direction_selection": ("direction_selection_all", direction_selection),
    "category_cosines": ("category_cosines", category_cosines),
    "feature_clamping": ("feature_table", feature_clamping),
    "capability_by_intervention": ("capability_table", capability_by_intervention),
    "feature_count_curve": ("feature_count_curve", feature_count_curve),
    "attribution_by_layer": ("attribution_by_layer", attribution_by_layer),
    "refusal_along_sequence": ("refusal_along_sequence", refusal_along_sequence),
    "feature_graph": ("feature_graph", feature_graph),
    "probe_comparison": ("probe_comparison", probe_comparison),
    "jailbreak_drop": ("jailbreak_summary", jailbreak_drop),
    "harm_judgment": ("harm_judgment", harm_judgment),
}
"""Figure name to (named query it is drawn from, drawing function)."""


def save(figure, path: Location) -> Location:
    """Write a figure as PNG atomically (locally or on an object store) and close it."""
    figure.tight_layout()
    try:
        return write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=DPI, format="png"))
    finally:
        plt.close(figure)
