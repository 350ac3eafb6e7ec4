"""Intervals and paired tests for accuracies measured on the same examples.

Two prompts scored on the same examples are paired: what decides which is better is the
examples where they DISAGREE. McNemar's exact test looks only at those: under "no
difference", an example one prompt gets right and the other wrong is equally likely to go
either way, so the count that favours A among the n discordant pairs is Binomial(n, 1/2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (sensible at 0 % and 100 %, unlike the normal one)."""
    if total == 0:
        return (0.0, 1.0)
    ci = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class PairedComparison:
    """A versus B on the same examples."""

    both: int  # both right
    only_a: int  # A right, B wrong
    only_b: int  # B right, A wrong
    neither: int
    p_value: float  # McNemar's exact test, two-sided

    @property
    def total(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def difference(self) -> float:
        """accuracy(A) - accuracy(B)."""
        return (self.only_a - self.only_b) / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {
            "both": self.both,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "neither": self.neither,
            "difference": self.difference,
            "p_value": self.p_value,
            "test": "mcnemar_exact",
        }


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test from the two discordant counts (1.0 when none)."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return float(binomtest(only_a, discordant, 0.5).pvalue)


def compare_paired(a: Sequence[bool], b: Sequence[bool]) -> PairedComparison:
    """Count agreement of two per-example outcome lists (same examples, same order) and test it."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must cover the same examples ({len(a)} vs {len(b)})")
    both = sum(x and y for x, y in zip(a, b))
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return PairedComparison(both, only_a, only_b, len(a) - both - only_a - only_b, mcnemar_exact(only_a, only_b))
