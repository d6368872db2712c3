import numpy as np
import pyarrow as pa
import torch

from refusal_core.activations import INSTRUCTION_TOKEN
from refusal_core.directions import directions_by_category
from refusal_core.models import LoadedModel
from refusal_core.registry import load_registry
from refusal_core.selection import select_refusal_direction
from refusal_core.tables import DIRECTION_CANDIDATES, DIRECTIONS, PROMPT_BEHAVIOUR, activations_schema

LAYERS, POSITIONS, WIDTH = (0, 1, 2), (-4, -3, -2, -1), 64
PLANTED = (1, -2)
TOKENS = {-4: INSTRUCTION_TOKEN, -3: "<a>", -2: "<b>", -1: "<c>"}


def _planted_study(rng):
    """Prompts, activations and behaviour where only the refused harmful train prompts carry +4u at PLANTED.

    The harmful train prompts the model answers carry -4u there, so a direction taken over every harmful prompt,
    not only the refused ones, would be far shorter than 4.
    """
    unit = rng.normal(size=WIDTH)
    unit /= np.linalg.norm(unit)
    offset = rng.normal(size=WIDTH) * 3.0  # what every residual stream shares
    groups = {"harmful": [("train", 1.0)] * 8 + [("train", -1.0)] * 4 + [("val", 1.0)] * 4,
              "harmless": [("train", -1.0)] * 8 + [("train", 1.0)] * 2 + [("val", -1.0)] * 4,
              "over_refusal": [("train", 1.0)] * 5}
    prompts, behaviour, activations = [], [], []
    for label, members in groups.items():
        for i, (split, score) in enumerate(members):
            prompt_id = f"{label}{i:02d}"
            prompts.append({"prompt_id": prompt_id, "text": f"{label} request number {i}", "label": label,
                            "category": "c", "split": split})
            behaviour.append({"model_key": "m", "prompt_id": prompt_id, "label": label, "split": split,
                              "refusal_score": score, "refused": score > 0})
            for layer in LAYERS:
                for position in POSITIONS:
                    vector = offset + 0.1 * rng.normal(size=WIDTH)
                    if (layer, position) == PLANTED and label == "harmful" and split == "train":
                        vector = vector + 4.0 * score * unit
                    activations.append({"model_key": "m", "prompt_id": prompt_id, "layer_index": layer,
                                        "position": position, "token": TOKENS[position],
                                        "activation": vector.astype(np.float32).tolist()})
    return (pa.Table.from_pylist(prompts), pa.Table.from_pylist(activations, schema=activations_schema(WIDTH)),
            pa.Table.from_pylist(behaviour, schema=PROMPT_BEHAVIOUR), torch.from_numpy(unit))


def test_the_planted_direction_of_the_refused_prompts_is_selected(tiny_registry, qwen):
    prompts, activations, behaviour, unit = _planted_study(np.random.default_rng(0))
    study = load_registry(tiny_registry).get("tiny-qwen2")
    study = study.model_copy(update={"settings": study.settings.model_copy(update={"direction_candidates": 1})})
    loaded = LoadedModel(*qwen, study, "local:tiny", "0" * 64)
    selection = select_refusal_direction(loaded, prompts, activations, behaviour)
    assert selection.candidates.by_cosine == PLANTED and selection.candidates.shortlist == [PLANTED]
    assert selection.n_train == {"harmful": 8, "harmless": 8} and not [n for n in selection.notes if "unfiltered" in n]
    table = selection.table()
    assert table.schema == DIRECTION_CANDIDATES
    assert [(r["layer_index"], r["position"]) for r in table.to_pylist()] == [(l, p) for l in LAYERS for p in POSITIONS[1:]]
    [chosen] = table.filter(table["selected"]).to_pylist()
    assert (chosen["layer_index"], chosen["position"], chosen["token"]) == (*PLANTED, "<b>") and chosen["evaluated"]
    direction = torch.tensor(chosen["direction"], dtype=torch.float64)
    assert torch.nn.functional.cosine_similarity(direction, unit, dim=0) > 0.99
    assert abs(float(direction.norm()) - 4.0) < 0.3  # the answered harmful prompts (-4u) were left out
    assert selection.metadata()["selected_layer"] == PLANTED[0]

    by_category = directions_by_category(prompts, activations, table)
    assert by_category.table().schema == DIRECTIONS and by_category.skipped == {}
    rows = {row["name"]: row for row in by_category.rows}
    assert list(rows) == ["category:c", "harmfulness", "over_refusal", "refusal"]
    assert rows["refusal"]["direction"] == chosen["direction"]
    # Every harmful prompt, answered ones too: (8 x 4u + 4 x -4u) / 16 = 1u at the planted place.
    category = torch.tensor(rows["category:c"]["direction"], dtype=torch.float64)
    assert rows["category:c"]["n_prompts"] == 16 and abs(float(category @ unit) - 1.0) < 0.3
    assert rows["harmfulness"]["position"] == -4 and rows["harmfulness"]["token"] == INSTRUCTION_TOKEN


def test_the_kl_bound_is_tested_against_the_standard_error_of_the_mean():
    from refusal_core.selection import MAX_KL, CandidateEvaluation, choose

    # Just above the bound within sampling error passes; far above it, or with a precise estimate, fails.
    within = CandidateEvaluation(3, -1, 0.5, 1.0, MAX_KL + 0.01, 0.01)
    beyond = CandidateEvaluation(4, -1, -2.0, 1.0, MAX_KL + 0.05, 0.01)
    precise = CandidateEvaluation(5, -1, -3.0, 1.0, MAX_KL + 0.001, 0.0)
    assert within.passes and not beyond.passes and not precise.passes
    assert choose([within, beyond, precise]) == (within, True)
    assert choose([beyond, precise]) == (precise, False)
