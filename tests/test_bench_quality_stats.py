"""scripts/bench_quality.py's comparison of the default with "the best single pair" (issue 9's floor)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def bq(script_module):
    return script_module("bench_quality")


def _answers(p: float, n: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return "".join("1" if x else "0" for x in (torch.rand(n, generator=gen) < p).tolist())


def test_held_out_gap_removes_the_maximum_s_bias(bq):
    """Twenty pairs no better than the default, over 100 independent sets of 1,000 questions: the best of
    them measured on the same questions looks ahead of the default (selection alone), a pair picked on
    one half and measured on the other does not, on average (one set's estimate is as noisy as its
    paired interval, so the test averages over sets)."""
    n, sets = 1000, 100
    biased, unbiased = [], []
    for k in range(sets):
        default = _answers(0.6, n, seed=100 * k)
        pairs = [_answers(0.6, n, seed=100 * k + s) for s in range(1, 21)]
        biased.append((default.count("1") - max(p.count("1") for p in pairs)) / n)
        unbiased.append(bq.held_out_gap(default, pairs, splits=2))
    assert sum(biased) / sets < -0.015  # about 2 points here
    assert abs(sum(unbiased) / sets) < 0.006


def test_held_out_gap_finds_a_really_better_pair(bq):
    """One pair answers 5 points more right than the default and the rest: it is picked on either half,
    and the gap is its true lead."""
    n = 2000
    default = _answers(0.6, n, seed=0)
    better = "".join("1" if i % 20 == 0 else c for i, c in enumerate(default))  # + every 20th question
    pairs = [_answers(0.5, n, seed=s) for s in range(1, 6)] + [better]
    lead = (better.count("1") - default.count("1")) / n
    assert abs(bq.held_out_gap(default, pairs) + lead) < 0.005


def test_held_out_gap_needs_per_question_results(bq):
    assert bq.held_out_gap("", ["101"]) is None
    assert bq.held_out_gap("101", ["10"]) is None
    assert bq.held_out_gap("101", []) is None
