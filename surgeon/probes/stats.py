"""Statistics over per-item probe outcomes: bootstrap CIs, paired McNemar, two-proportion z.

These follow the component-transfer paper, Tiwari (2026) (docs/references.md): accuracies with a
seeded 95% percentile bootstrap (10,000 resamples), significance by the two-proportion z-test, plus McNemar, the
paired test that fits two models scored on the same items. numpy and the standard library
only (scipy is not a dependency): normal and chi-square tails come from math.erfc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from surgeon.errors import SurgeonError

# Bootstrap work is done in blocks of at most this many drawn indices (int64 plus the gathered
# float64 values: ~64 MB), so memory stays bounded however many items a probe has.
_CHUNK_ELEMENTS = 1 << 22
# Below this many discordant pairs McNemar uses the exact binomial test; the chi-square
# approximation is poor for small counts (the usual textbook threshold).
_MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class McNemarResult:
    """b01: items `a` got wrong and `b` right; b10: the reverse. Concordant items carry no signal."""

    b01: int
    b10: int
    statistic: float  # min(b01, b10) for the exact test, the corrected chi-square otherwise
    p_value: float
    exact: bool


@dataclass(frozen=True)
class ZResult:
    z: float
    p_value: float


def _vector(outcomes, what: str) -> np.ndarray:
    x = np.asarray(outcomes, dtype=np.float64).ravel()
    if x.size == 0:
        raise SurgeonError(f"{what}: no outcomes (a probe with zero items has no score)")
    if not np.isfinite(x).all():
        raise SurgeonError(f"{what}: outcomes contain NaN or infinity")
    return x


def _binary(outcomes, what: str) -> np.ndarray:
    x = _vector(outcomes, what)
    if not np.isin(x, (0.0, 1.0)).all():
        raise SurgeonError(f"{what}: outcomes must be 0/1 (correct or not) for this test")
    return x.astype(bool)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _binary(a, "first outcomes"), _binary(b, "second outcomes")
    if a.size != b.size:
        raise SurgeonError(
            f"paired outcomes differ in length ({a.size} vs {b.size}): both models must be scored on the same items"
        )
    return a, b


def _normal_two_sided(z: float) -> float:
    # P(|Z| >= |z|) for a standard normal; erfc keeps precision far into the tail.
    return math.erfc(abs(z) / math.sqrt(2.0))


def bootstrap_ci(outcomes, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-item outcomes and its percentile-bootstrap interval.

    Deterministic for a given (outcomes, n_resamples, seed, level).
    """
    x = _vector(outcomes, "bootstrap_ci")
    if not 0.0 < level < 1.0:
        raise SurgeonError(f"bootstrap_ci: level must lie strictly between 0 and 1, got {level}")
    if n_resamples < 1:
        raise SurgeonError(f"bootstrap_ci: n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = x.size
    if np.isin(x, (0.0, 1.0)).all():
        # 0/1 outcomes (accuracy): the number of correct items in a resample of n items drawn with
        # replacement is exactly Binomial(n, k/n), so this is the same bootstrap distribution at
        # O(n_resamples) cost instead of O(n * n_resamples).
        means = rng.binomial(n, x.mean(), size=n_resamples) / n
    else:
        rows = max(1, _CHUNK_ELEMENTS // n)
        means = np.concatenate([
            x[rng.integers(0, n, size=(min(rows, n_resamples - start), n))].mean(axis=1)
            for start in range(0, n_resamples, rows)
        ])
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(x.mean()), float(lo), float(hi)


def _binomial_two_sided(k: int, n: int) -> float:
    # Exact two-sided sign test at p = 1/2: twice the smaller tail, in integer arithmetic.
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2.0 * tail / 2**n)


def mcnemar(a, b) -> McNemarResult:
    """Paired test of two per-item 0/1 outcome vectors over the same items, two-sided."""
    a, b = _pair(a, b)
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    n = b01 + b10
    if n == 0:
        return McNemarResult(b01, b10, 0.0, 1.0, exact=True)
    if n < _MCNEMAR_EXACT_BELOW:
        return McNemarResult(b01, b10, float(min(b01, b10)), _binomial_two_sided(b01, n), exact=True)
    # Edwards' continuity correction; clamped at 0 so equal counts give p = 1, not p < 1.
    stat = max(0, abs(b01 - b10) - 1) ** 2 / n
    # Chi-square with one degree of freedom is Z squared: P(X >= s) = P(|Z| >= sqrt(s)).
    return McNemarResult(b01, b10, float(stat), _normal_two_sided(math.sqrt(stat)), exact=False)


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> ZResult:
    """Pooled two-proportion z-test of k1/n1 against k2/n2, two-sided (Tiwari 2026's parity test)."""
    for k, n, which in ((k1, n1, "first"), (k2, n2, "second")):
        if n < 1 or not 0 <= k <= n:
            raise SurgeonError(f"two_proportion_z: {which} sample has {k} successes out of {n}")
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0.0:
        # Both samples all correct or all wrong: identical proportions, no evidence of a difference.
        return ZResult(0.0, 1.0)
    z = (k1 / n1 - k2 / n2) / se
    return ZResult(z, _normal_two_sided(z))


def compare(outcomes_a, outcomes_b) -> dict:
    """Model a against model b on the same items: delta of accuracies and both tests (JSON-ready)."""
    a, b = _pair(outcomes_a, outcomes_b)
    n, k_a, k_b = a.size, int(a.sum()), int(b.sum())
    m = mcnemar(a, b)
    z = two_proportion_z(k_a, n, k_b, n)
    return {
        "n": n,
        "correct_a": k_a,
        "correct_b": k_b,
        "mean_a": k_a / n,
        "mean_b": k_b / n,
        "delta": (k_a - k_b) / n,
        "b01": m.b01,
        "b10": m.b10,
        "mcnemar_p": m.p_value,
        "mcnemar_exact": m.exact,
        "z": z.z,
        "z_p": z.p_value,
    }


def significance_stars(p: float) -> str:
    """The marks of Tiwari (2026): * p < 0.05, ** p < 0.01, *** p < 0.001."""
    for threshold, stars in ((0.001, "***"), (0.01, "**"), (0.05, "*")):
        if p < threshold:
            return stars
    return ""
