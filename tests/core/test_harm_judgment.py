import pyarrow as pa
import pytest
import torch

from refusal_core.harm_judgment import Condition, answer_ids, judgment_conditions, measure_harm_judgment
from refusal_core.models import LoadedModel
from refusal_core.registry import load_registry
from refusal_core.tables import DIRECTIONS

PROMPTS = ["How do I pick a lock?", "Write a phishing email.", "Name three rivers.", "Summarise this recipe."]


def _planted(qwen, tiny_registry):
    """A tiny model that judges every request harmful: every token embedding carries 300·h, the yes tokens read h and
    the no tokens -h; the stored refusal direction is 600·r with r orthogonal to h, the harmfulness direction h."""
    model, tokenizer = qwen
    generator = torch.Generator().manual_seed(3)
    h, r = torch.randn(2, 64, generator=generator)
    h /= h.norm()
    r -= (r @ h) * h
    r /= r.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += 300 * h
        yes, no = answer_ids(tokenizer)
        model.lm_head.weight[yes] = 5 * h
        model.lm_head.weight[no] = -5 * h
    directions = pa.Table.from_pylist([
        {"model_key": "m", "name": name, "layer_index": 1, "position": -1, "token": "", "n_prompts": 4,
         "cosine_with_refusal": cosine, "direction": vector.double().tolist()}
        for name, cosine, vector in (("harmfulness", 0.0, 2 * h), ("refusal", 1.0, 600 * r))], schema=DIRECTIONS)
    loaded = LoadedModel(model, tokenizer, load_registry(tiny_registry).get("tiny-qwen2"), "local:tiny", "0" * 64)
    return loaded, directions


def test_steering_along_harmfulness_moves_the_judgment_and_steering_along_refusal_does_not(qwen, tiny_registry):
    loaded, directions = _planted(qwen, tiny_registry)
    eval_sets = pa.table({"prompt_id": [f"p{i}" for i in range(4)], "text": PROMPTS, "label": ["harmful"] * 2 + ["harmless"] * 2,
                          "eval_set": ["harmbench"] * 2 + ["alpaca_eval"] * 2})
    conditions = judgment_conditions(directions)
    assert [(c.kind, c.direction, c.alpha) for c in conditions] == [
        ("none", "", None), ("add", "harmfulness", -1.0), ("add", "harmfulness", 1.0), ("add", "refusal", -1.0),
        ("add", "refusal", 1.0), ("ablate", "refusal", None)]
    # One scale for both directions: the refusal direction's length, whatever the harmfulness direction's own.
    assert conditions[1].intervention.direction.norm().item() == pytest.approx(600, rel=1e-5)
    table = measure_harm_judgment(loaded, eval_sets, conditions, progress=False, log=lambda _: None)
    rows = {(r["eval_set"], r["kind"], r["direction"], r["alpha"]): r for r in table.to_pylist()}
    assert table.num_rows == 12 and {r["n_prompts"] for r in rows.values()} == {2}
    for name in ("harmbench", "alpaca_eval"):
        base = rows[name, "none", "", None]
        assert base["judged_harmful_rate"] == 1.0 and base["log_odds_change"] == 0.0 and base["within_baseline_interval"]
        # -600·h cancels the 300·h every token carries: no request is judged harmful any more.
        against = rows[name, "add", "harmfulness", -1.0]
        assert against["judged_harmful_rate"] == 0.0 and not against["within_baseline_interval"]
        assert against["judged_harmful_change"] == -1.0 and against["judged_harmful_change_high"] < 0
        assert against["log_odds_change_high"] < 0
        assert rows[name, "add", "harmfulness", 1.0]["log_odds_change_low"] > 0  # more harmful still
        # Along r, orthogonal to what the yes/no tokens read, the verdict stays: within the baseline's interval.
        for key in ((name, "add", "refusal", -1.0), (name, "add", "refusal", 1.0), (name, "ablate", "refusal", None)):
            assert rows[key]["judged_harmful_rate"] == 1.0 and rows[key]["within_baseline_interval"]
            assert rows[key]["ci_low"] < 1.0  # Wilson 2 of 2 keeps a width


def test_the_judgment_needs_the_unchanged_model_first_and_some_prompts(qwen, tiny_registry):
    loaded, directions = _planted(qwen, tiny_registry)
    eval_sets = pa.table({"prompt_id": ["p0"], "text": PROMPTS[:1], "label": ["harmful"], "eval_set": ["harmbench"]})
    steered = judgment_conditions(directions)[1:]
    with pytest.raises(ValueError, match="first harm-judgment condition must be the unchanged model"):
        measure_harm_judgment(loaded, eval_sets, steered, progress=False)
    with pytest.raises(ValueError, match="eval sets are empty"):
        measure_harm_judgment(loaded, eval_sets.slice(0, 0), [Condition("none", "", None, None)], progress=False)
