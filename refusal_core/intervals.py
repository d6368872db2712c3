"""95% intervals for rates (Wilson score), for the difference of two rates over the same prompts (Newcombe) and for a mean across draws."""

from __future__ import annotations

import math
from collections.abc import Sequence

from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW


def wilson_interval(count: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of the rate `count` / `n`.

    Unlike a bootstrap over 0/1 verdicts, it does not collapse to one point when every verdict agrees:
    0 of 32 gives [0, 0.107].
    """
    if n <= 0:
        raise ValueError("Cannot compute a rate over zero items.")
    if not 0 <= count <= n:
        raise ValueError(f"A rate's count must lie between 0 and its n; got {count} of {n}.")
    low, high = proportion_confint(count, n, alpha=0.05, method="wilson")
    return max(0.0, float(low)), min(1.0, float(high))


def paired_difference(first: Sequence[bool], second: Sequence[bool]) -> tuple[float, float, float]:
    """rate(first) - rate(second) over the same items (paired verdicts, in the same order), with its 95% interval.

    The interval is Newcombe's (1998) hybrid score interval for paired proportions, method 10: it combines
    the Wilson intervals of the two rates, corrected for the correlation between the paired verdicts. It is
    built from the same Wilson intervals as the rates themselves, stays within [-1, 1], and keeps a width when
    no pair disagrees (the plain Wald interval then has none). statsmodels has no release with an interval for
    paired proportions (its development branch adds `confint_proportions_paired`, also method 10 by default).

    Returns (difference, low, high).
    """
    if len(first) != len(second):
        raise ValueError(f"Paired verdicts need the same items on both sides; got {len(first)} and {len(second)}.")
    n = len(first)
    if n == 0:
        raise ValueError("Cannot compare rates over zero paired items.")
    both = sum(1 for a, b in zip(first, second) if a and b)
    first_only = sum(1 for a, b in zip(first, second) if a and not b)
    second_only = sum(1 for a, b in zip(first, second) if b and not a)
    neither = n - both - first_only - second_only
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n)
    l2, u2 = wilson_interval(both + second_only, n)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - first_only * second_only
        phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)
    difference = p1 - p2
    low = difference - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = difference + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return difference, max(-1.0, low), min(1.0, high)


def mean_interval(values: Sequence[float], low: float = 0.0, high: float = 1.0) -> tuple[float, float, float]:
    """Mean of `values` (one per seeded draw, say) with its 95% Student t interval across them, clipped to [low, high].

    The interval speaks of the spread between draws, not of the prompts within one: draws that all give
    the same rate give an interval of no width. Returns (mean, low, high).
    """
    if len(values) < 2:
        raise ValueError(f"A t interval needs at least 2 values; got {len(values)}.")
    statistics = DescrStatsW([float(v) for v in values])
    interval_low, interval_high = statistics.tconfint_mean(alpha=0.05)
    return float(statistics.mean), max(low, float(interval_low)), min(high, float(interval_high))


def draws_interval(rates: Sequence[float], n: int) -> tuple[float, float, float]:
    """Mean of the refusal rates of seeded draws over the same `n` prompts, with a 95% interval that covers both
    the spread between the draws (`mean_interval`) and the sampling of the prompts (the Wilson interval of the mean
    rate at `n`): the hull of the two. Draws that all give 2 of 32 keep the width of 2 of 32, [2, 20]%, not none.

    Returns (mean, low, high).
    """
    mean, low, high = mean_interval(rates)
    prompts_low, prompts_high = proportion_confint(mean * n, n, alpha=0.05, method="wilson")
    return mean, max(0.0, min(low, float(prompts_low))), min(1.0, max(high, float(prompts_high)))


def draws_difference_interval(differences: Sequence[float], lows: Sequence[float], highs: Sequence[float]
                              ) -> tuple[float, float, float]:
    """Mean of the draws' paired differences from the baseline, with the hull of the t interval across them and of
    the mean of their own paired intervals (`paired_difference`), so identical draws keep a width. Returns (mean, low, high)."""
    mean, low, high = mean_interval(differences, low=-1.0, high=1.0)
    return mean, min(low, sum(lows) / len(lows)), max(high, sum(highs) / len(highs))
