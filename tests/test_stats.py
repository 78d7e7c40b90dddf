"""Statistics against hand-computed textbook values and Tiwari (2026)'s own numbers."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from surgeon.errors import SurgeonError
from surgeon.probes import stats
from surgeon.probes.stats import (
    bootstrap_ci,
    compare,
    mcnemar,
    significance_stars,
    two_proportion_z,
)


def normal_tail_by_integration(z: float) -> float:
    """P(|Z| >= z) by Simpson's rule on the normal density: independent of math.erf/erfc."""
    lo, hi, steps = abs(z), abs(z) + 12.0, 20_000
    h = (hi - lo) / steps
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    s = pdf(lo) + pdf(hi) + sum((4 if i % 2 else 2) * pdf(lo + i * h) for i in range(1, steps))
    return 2 * s * h / 3


def paired(b01, b10, both=0, neither=0):
    """Outcome vectors with the given discordant and concordant counts."""
    a = [0] * b01 + [1] * b10 + [1] * both + [0] * neither
    b = [1] * b01 + [0] * b10 + [1] * both + [0] * neither
    return a, b


# ---- McNemar


@pytest.mark.parametrize("b01, b10, p", [
    (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 2 * P(X <= 2), X ~ Bin(10, 1/2) = 112/1024
    (8, 2, 2 * (1 + 10 + 45) / 2**10),  # symmetric
    (0, 5, 2 / 2**5),                   # all five discordant pairs one way
    (1, 0, 1.0),                         # 2 * P(X <= 0) = 1, capped
    (3, 3, 1.0),                         # 2 * 42/64 > 1, capped
    (4, 20, 2 * sum(math.comb(24, i) for i in range(5)) / 2**24),  # 24 pairs: still exact
])
def test_mcnemar_exact_binomial_below_25_pairs(b01, b10, p):
    r = mcnemar(*paired(b01, b10, both=30, neither=11))
    assert (r.b01, r.b10, r.exact) == (b01, b10, True)
    assert r.statistic == min(b01, b10)
    assert r.p_value == pytest.approx(p, rel=1e-12)


def test_mcnemar_chi_square_from_25_pairs():
    r = mcnemar(*paired(5, 20))
    assert not r.exact
    assert r.statistic == pytest.approx((15 - 1) ** 2 / 25)  # 7.84
    assert r.p_value == pytest.approx(normal_tail_by_integration(math.sqrt(7.84)), rel=1e-7)


def test_mcnemar_textbook_presidential_approval():
    # Agresti, Categorical Data Analysis, table 10.1: 1600 people asked twice; 150 approve then
    # disapprove, 86 disapprove then approve, 794 and 570 concordant.
    a, b = paired(b01=86, b10=150, both=794, neither=570)
    r = mcnemar(a, b)
    assert (r.b01, r.b10) == (86, 150)
    assert r.statistic == pytest.approx(63**2 / 236)  # (|86 - 150| - 1)^2 / (86 + 150) = 16.82
    assert r.p_value == pytest.approx(normal_tail_by_integration(math.sqrt(63**2 / 236)), rel=1e-6)
    assert r.p_value < 0.001


def test_mcnemar_chi_square_with_equal_counts_is_p_one():
    r = mcnemar(*paired(20, 20))
    assert (r.statistic, r.p_value, r.exact) == (0.0, 1.0, False)


def test_mcnemar_identical_outcomes():
    r = mcnemar([1, 0, 1, 1], [1, 0, 1, 1])
    assert (r.b01, r.b10, r.p_value) == (0, 0, 1.0)


def test_mcnemar_accepts_bools_and_arrays():
    a, b = paired(2, 8, both=3)
    assert mcnemar(np.array(a, dtype=bool), np.array(b, dtype=np.int8)) == mcnemar(a, b)


def test_mcnemar_refuses_different_lengths_and_non_binary():
    with pytest.raises(SurgeonError, match=r"differ in length \(3 vs 2\): both models must be scored on the same items"):
        mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(SurgeonError, match="must be 0/1"):
        mcnemar([1, 0.5], [1, 0])
    with pytest.raises(SurgeonError, match="no outcomes"):
        mcnemar([], [])


# ---- two-proportion z-test


def test_z_test_by_hand():
    # 60/100 against 45/100: pooled p = 105/200 = 0.525, se = sqrt(0.525 * 0.475 * (2/100)).
    se = math.sqrt(0.525 * 0.475 * 0.02)
    r = two_proportion_z(60, 100, 45, 100)
    assert r.z == pytest.approx(0.15 / se)  # 2.1240
    assert r.p_value == pytest.approx(normal_tail_by_integration(0.15 / se), rel=1e-7)  # 0.0337
    assert two_proportion_z(45, 100, 60, 100).z == pytest.approx(-r.z)


@pytest.mark.parametrize("z, p", [(1.959963984540054, 0.05), (2.5758293035489, 0.01), (3.2905267314919, 0.001)])
def test_normal_tail_at_the_textbook_critical_values(z, p):
    # The two-sided critical values of the standard normal (tables): both tests' p-values use this tail.
    assert stats._normal_two_sided(z) == pytest.approx(p, rel=1e-9)
    assert stats._normal_two_sided(-z) == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize("k1, k2, n, paper_p", [
    (891, 904, 1319, 0.59),  # GSM8K: attention+experts 67.6% vs Tulu 3 68.5%
    (733, 714, 1172, 0.42),  # ARC-Challenge 5-shot: experts 62.5% vs Tulu 3 60.9%
    (714, 688, 1172, 0.27),  # ARC-Challenge 0-shot: attention 60.9% vs Tulu 3 58.7%
])
def test_z_test_reproduces_the_papers_p_values(k1, k2, n, paper_p):
    # Counts consistent with Tiwari (2026)'s rounded percentages on the full test sets (table 1).
    assert round(two_proportion_z(k1, n, k2, n).p_value, 2) == paper_p


def test_z_test_paper_boolq_is_highly_significant():
    # BoolQ (3270 items): attention+experts 79.2% vs Tulu 3 75.4%, reported p < 0.001.
    assert two_proportion_z(2590, 3270, 2466, 3270).p_value < 0.001


def test_z_test_equal_extremes_and_bad_counts():
    assert two_proportion_z(10, 10, 20, 20) == stats.ZResult(0.0, 1.0)
    assert two_proportion_z(0, 10, 0, 20) == stats.ZResult(0.0, 1.0)
    with pytest.raises(SurgeonError, match="first sample has 11 successes out of 10"):
        two_proportion_z(11, 10, 1, 10)
    with pytest.raises(SurgeonError, match="second sample has 0 successes out of 0"):
        two_proportion_z(1, 10, 0, 0)


# ---- bootstrap


def test_bootstrap_is_deterministic_with_a_seed():
    x = np.random.default_rng(5).random(300)
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    assert bootstrap_ci(x, seed=1) != bootstrap_ci(x, seed=2)
    acc = [1, 0, 1, 1, 0] * 40
    assert bootstrap_ci(acc, seed=3) == bootstrap_ci(acc, seed=3)


@pytest.mark.parametrize("outcomes", [
    [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 20,
    list(np.random.default_rng(0).random(500)),
])
def test_bootstrap_ci_covers_the_mean(outcomes):
    mean, lo, hi = bootstrap_ci(outcomes)
    assert mean == pytest.approx(np.mean(outcomes))
    assert lo < mean < hi


def test_bootstrap_ci_width_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10_000):
        _, lo, hi = bootstrap_ci(rng.random(n) < 0.7, seed=0)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.2)  # width ~ 1/sqrt(n)


def test_bootstrap_matches_the_papers_margins():
    # BoolQ: 79.2% of 3270 items is reported as +-1.4%; 500-item margins of +-3.6 to 4.4%.
    mean, lo, hi = bootstrap_ci([1] * 2590 + [0] * 680)
    assert round((hi - lo) / 2, 3) == 0.014
    _, lo, hi = bootstrap_ci([1] * 250 + [0] * 250)
    assert 0.036 <= round((hi - lo) / 2, 3) <= 0.044


def test_bootstrap_agrees_with_the_normal_approximation():
    # For a proportion the percentile interval is close to p +- 1.96 sqrt(p (1 - p) / n).
    p, n = 0.6, 2000
    mean, lo, hi = bootstrap_ci([1] * 1200 + [0] * 800, seed=4)
    half = 1.959963984540054 * math.sqrt(p * (1 - p) / n)
    assert lo == pytest.approx(p - half, abs=0.002)
    assert hi == pytest.approx(p + half, abs=0.002)


def test_binary_shortcut_agrees_with_resampling_items():
    # Outcomes of 0/2 take the item-resampling path; their interval must be twice that of 0/1.
    acc = np.r_[np.ones(350), np.zeros(150)]
    _, lo, hi = bootstrap_ci(acc, seed=0)
    _, lo2, hi2 = bootstrap_ci(acc * 2, seed=0)
    assert lo2 / 2 == pytest.approx(lo, abs=0.004)
    assert hi2 / 2 == pytest.approx(hi, abs=0.004)


def test_bootstrap_in_chunks_bounds_memory(monkeypatch):
    x = np.random.default_rng(2).random(400)
    whole = bootstrap_ci(x, seed=0)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1000)  # two resamples per block: 5000 blocks
    chunked = bootstrap_ci(x, seed=0)
    assert chunked == bootstrap_ci(x, seed=0)
    assert chunked[0] == whole[0]
    assert chunked[1] == pytest.approx(whole[1], abs=0.005)
    assert chunked[2] == pytest.approx(whole[2], abs=0.005)


def test_bootstrap_level_and_resample_count():
    x = [1, 0, 1, 1] * 50
    _, lo90, hi90 = bootstrap_ci(x, level=0.90)
    _, lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 < lo90 and hi90 < hi99
    assert bootstrap_ci(x, n_resamples=1)[1] == bootstrap_ci(x, n_resamples=1)[2]


@pytest.mark.parametrize("value", [0, 1, 0.25])
def test_bootstrap_all_equal_outcomes_is_a_point(value):
    assert bootstrap_ci([value] * 50) == (value, value, value)


@pytest.mark.parametrize("kwargs, match", [
    ({"outcomes": []}, "no outcomes"),
    ({"outcomes": [1.0, float("nan")]}, "NaN or infinity"),
    ({"outcomes": [1, 0], "level": 1.0}, "level must lie strictly between 0 and 1"),
    ({"outcomes": [1, 0], "n_resamples": 0}, "n_resamples must be at least 1"),
])
def test_bootstrap_bad_input(kwargs, match):
    with pytest.raises(SurgeonError, match=match):
        bootstrap_ci(**kwargs)


# ---- compare and stars


def test_compare_by_hand():
    a, b = paired(b01=2, b10=8, both=30, neither=10)  # a: 38/50 correct, b: 32/50
    r = compare(a, b)
    assert r == {
        "n": 50, "correct_a": 38, "correct_b": 32, "mean_a": 0.76, "mean_b": 0.64,
        "delta": pytest.approx(0.12), "b01": 2, "b10": 8,
        "mcnemar_p": pytest.approx(112 / 1024), "mcnemar_exact": True,
        "z": pytest.approx(two_proportion_z(38, 50, 32, 50).z),
        "z_p": pytest.approx(two_proportion_z(38, 50, 32, 50).p_value),
    }
    json.dumps(r)  # goes straight into a session file
    assert compare(b, a)["delta"] == pytest.approx(-0.12)


def test_compare_refuses_vectors_of_different_lengths_or_empty():
    with pytest.raises(SurgeonError, match=r"differ in length \(4 vs 5\)"):
        compare([1, 0, 1, 1], [1, 0, 1, 1, 0])
    with pytest.raises(SurgeonError, match="no outcomes"):
        compare([], [])


@pytest.mark.parametrize("p, stars", [
    (0.5, ""), (0.05, ""), (0.0499, "*"), (0.01, "*"), (0.0099, "**"), (0.001, "**"), (0.0009, "***"),
    (0.0, "***"), (1.0, ""), (float("nan"), ""),
])
def test_significance_stars(p, stars):
    assert significance_stars(p) == stars


# ---- layering


def test_statistics_and_probe_data_import_no_heavy_libraries():
    code = (
        "import sys, surgeon.probes.stats, surgeon.probes.data;"
        "heavy = [m for m in ('torch', 'transformers', 'textual', 'scipy') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
