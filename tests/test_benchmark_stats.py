"""The statistics behind the benchmarks' bar verdicts (`benchmarks/common.py`).

The benchmarks themselves are not tests (speed belongs in `benchmarks/`), but
their verdicts "met" / "NOT met" / "undecided" are claims the README repeats,
so the interval they come from is checked here.
"""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402


def _binomial_coverage(n, j):
    """P(x_(j+1) <= median <= x_(n-j)) for n independent draws of a continuous distribution."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n


@pytest.mark.parametrize("n, rank", [(6, 1), (9, 2), (21, 6), (41, 14)])
def test_interval_is_the_order_statistics_of_the_binomial_rule(n, rank):
    values = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))
    low, high, coverage = common.median_interval(values)
    assert (low, high) == (rank, n + 1 - rank)
    assert coverage == pytest.approx(_binomial_coverage(n, rank - 1), abs=1e-12)
    assert coverage >= 0.95
    # One rank further in would fall below 95%.
    assert _binomial_coverage(n, rank) < 0.95


def test_too_few_values_give_min_max_and_say_the_lower_coverage():
    assert common.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, pytest.approx(0.75))
    with pytest.raises(ValueError, match="must not be empty"):
        common.median_interval([])


def test_coverage_holds_for_a_skewed_distribution():
    rng = np.random.default_rng(0)
    n, trials, median = 9, 4000, math.log(2)  # the exponential's median
    hits = 0
    for _ in range(trials):
        low, high, coverage = common.median_interval(rng.standard_exponential(n))
        hits += low <= median <= high
    assert hits / trials == pytest.approx(coverage, abs=0.02)


def test_verdict_needs_the_whole_interval_on_one_side_of_the_bar():
    below = [0.99, 1.0, 1.01, 1.0, 1.02, 0.98, 1.0, 1.01, 1.0]
    assert common.bar_verdict(common.median_interval(below), 1.03) == "met"
    assert common.bar_verdict(common.median_interval([r + 0.05 for r in below]), 1.03) == "NOT met"
    straddling = np.linspace(1.0, 1.06, 9)  # median 1.03, interval 1.0075-1.0525
    assert common.bar_verdict(common.median_interval(straddling), 1.03).startswith("undecided")
    # The median alone is below the bar here, and still no verdict.
    assert common.bar_verdict(common.median_interval(straddling - 0.005), 1.03).startswith("undecided")


def test_instance_means_are_per_round_geometric_means():
    times = {"bare": [1.0, 2.0], "bare#2": [4.0, 8.0], "guard": [3.0, 3.0]}
    means = common.instance_means(times, {"bare": ["bare", "bare#2"], "guard": ["guard"]})
    assert means["bare"] == pytest.approx([2.0, 4.0], rel=1e-12)
    assert means["guard"] == [3.0, 3.0]
    # One instance: the times themselves, bit for bit.
    odd = {"bare": [2.759, 12.413]}  # exp(log(t)) != t for both
    assert common.instance_means(odd, {"bare": ["bare"]})["bare"] == odd["bare"]


def test_interleaved_with_instances_reports_one_entry_per_variant():
    calls = []
    steps = {common.instance_key(v, i): (lambda k=common.instance_key(v, i): calls.append(k))
             for v in ("bare", "guard") for i in range(3)}
    assert sorted(steps) == ["bare", "bare#2", "bare#3", "guard", "guard#2", "guard#3"]
    instances_of = {v: [common.instance_key(v, i) for i in range(3)] for v in ("bare", "guard")}
    stats = common.interleaved(steps, "bare", rounds=4, inner=2, warmup=1, instances_of=instances_of)
    assert sorted(stats) == ["bare", "guard"]
    assert all(len(stats[v]["instance_median_ms"]) == 3 and stats[v]["rounds"] == 4 for v in stats)
    assert stats["bare"]["ratio"] == [1.0] * 4
    # Every instance ran its warm-up call and `inner` steps in each of the 4 rounds.
    assert {k: calls.count(k) for k in steps} == {k: 1 + 4 * 2 for k in steps}
