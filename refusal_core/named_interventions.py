"""Study interventions named as the CLI spells them, built from a study's stored tables as the study builds them."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from refusal_core.directions import selected_direction
from refusal_core.interventions import Ablate, Add, Intervention
from refusal_core.models import LoadedModel
from refusal_core.registry import Study

INDUCED_SETS = ("cossim_ap", "random")
"""Feature sets also set on harmless prompts to induce refusal (the method and its control)."""

CLI_KINDS = "none, ablate, add[:COEF], clamp[:SET[:MULT]] or induce[:SET[:SCALE]]"
"""The interventions `named_intervention` reads, as the CLI spells them."""


def named_intervention(spec: str, study: Study, stored: Callable[[str], pa.Table | None]
                       ) -> Callable[[LoadedModel], Intervention | None]:
    """The study intervention `spec` names, built from the study's stored tables as the study builds it.

    `none`; `ablate`; `add[:COEF]` (the selected direction at its layer, COEF default 1); `clamp[:SET[:MULT]]`
    (a stored feature set's latents multiplied by -MULT, SET default `cossim_ap`, MULT default the study's
    `clamp_multiplier`); `induce[:SET[:SCALE]]` (set to the stored constants x SCALE, default 1: the constants
    already include `induce_multiplier`). SET is a feature set's name, `upstream`, or `random` (its first draw)
    or `random@SEED`. `stored(table)` is the study's stored table, or None when it was never materialized.

    Everything that can be wrong with `spec` or the stored tables is raised here, before any model is loaded;
    the result builds the intervention for the loaded model (and loads the SAEs a clamp needs).
    """
    kind, _, rest = spec.partition(":")
    if kind == "none" and not rest:
        return lambda loaded: None
    if kind not in ("ablate", "add", "clamp", "induce") or kind == "ablate" and rest:
        raise ValueError(f"Unknown intervention {spec!r}; use {CLI_KINDS}.")
    if kind in ("ablate", "add"):
        layer, direction = selected_direction(_stored(stored, "refusal_directions", study.key))
        if kind == "ablate":
            return lambda loaded: Ablate(direction.float())
        coefficient = _number(rest or "1", spec)
        return lambda loaded: Add(direction.float(), layer, coefficient)
    from refusal_core.features import feature_set_members  # sae-lens: imported only when an SAE is involved

    name, _, number = rest.partition(":")
    sets = with_upstream_set(feature_set_members(_stored(stored, "feature_sets", study.key)), stored("feature_edges"))
    names = {(n if s is None else f"{n}@{s}"): (n, s) for n, s in sets}
    seeds = sorted(s for n, s in sets if n == "random")
    if seeds:
        names["random"] = ("random", seeds[0])
    usable = sorted(n for n in names if kind == "clamp" or names[n][0] in INDUCED_SETS)
    if (name or "cossim_ap") not in usable:
        raise ValueError(f"Study {study.key!r} has no stored feature set {name or 'cossim_ap'!r} to {kind}; "
                         f"its sets are {', '.join(usable)}.")
    set_name, seed = names[name or "cossim_ap"]
    members = sets[(set_name, seed)]
    saes_table = _stored(stored, "saes", study.key)
    if kind == "clamp":
        factor = -(_number(number, spec) if number else study.settings.clamp_multiplier)
    else:
        factor, scale = None, _number(number or "1", spec)
        members = [{**m, "induce_value": m["induce_value"] * scale} for m in members] if scale != 1 else members

    def build(loaded: LoadedModel) -> Intervention:
        from refusal_core.chat import instruction_offset
        from refusal_core.saes import study_saes
        from refusal_core.study_interventions import feature_clamp

        skip_first = instruction_offset(loaded.tokenizer, loaded.study.chat_template)
        return feature_clamp(study_saes(loaded, saes_table), members, set_name, factor, skip_first, seed)

    return build


def with_upstream_set(sets: dict[tuple[str, int | None], list[dict]], feature_edges: pa.Table | None
                      ) -> dict[tuple[str, int | None], list[dict]]:
    """`sets` (`features.feature_set_members`) with the upstream set added as ("upstream", None): feature_edges'
    latents marked `in_upstream_set`, by (layer, latent); unchanged when there are none."""
    if feature_edges is not None:
        marked = feature_edges.filter(feature_edges["in_upstream_set"])
        upstream = sorted(set(zip(marked["upstream_layer"].to_pylist(), marked["upstream_latent"].to_pylist())))
        if upstream:
            sets = {**sets, ("upstream", None): [{"layer_index": layer, "latent_index": latent} for layer, latent in upstream]}
    return sets


def _stored(stored: Callable[[str], pa.Table | None], table: str, key: str) -> pa.Table:
    found = stored(table)
    if found is None:
        raise FileNotFoundError(f"Study {key!r} has no stored {table} yet; run `refusal-sae run --study {key}` first.")
    if found.num_rows == 0:
        raise ValueError(f"Study {key!r} stored an empty {table} (a study without SAEs has no feature sets); "
                         "use none, ablate or add.")
    return found


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} in intervention {spec!r} is not a number; use {CLI_KINDS}.") from None
