"""The bit-budget allocation (--target-bpw): never over budget, near the exact optimum, range errors."""

import itertools
import math
import random

import pytest

from quikft.quant.allocate import BudgetError, Candidate, allocate, efficient, reachable


def _layers(seed: int, n_layers: int = 4, n_candidates: int = 5) -> dict[str, list[Candidate]]:
    rng = random.Random(seed)
    layers = {}
    for index in range(n_layers):
        size = rng.randint(50, 500)
        cands = []
        for bits in (2, 3, 4, 8)[:n_candidates]:
            for k in (0, 16)[: 1 + (n_candidates > 4)]:
                storage = size * bits + 40 * k + rng.randint(0, 30)
                error = rng.uniform(0.5, 2.0) * size * 4.0 ** -bits / (1 + k / 8)
                cands.append(Candidate(bits, k, storage, error))
        layers[f"layer{index}"] = cands
    return layers


def _optimum(layers, budget):
    best = math.inf
    for combo in itertools.product(*layers.values()):
        if sum(c.storage for c in combo) <= budget:
            best = min(best, sum(c.error for c in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_choice_fits_the_budget_and_is_near_the_exact_optimum(seed):
    layers = _layers(seed)
    weights = 1000
    low, high = reachable(layers, weights)
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        target = low + fraction * (high - low)
        choice = allocate(layers, weights, target)
        assert set(choice) == set(layers)
        assert all(choice[name] in layers[name] for name in layers)
        storage = sum(c.storage for c in choice.values())
        assert storage <= math.floor(target * weights)  # never over budget
        found, best = sum(c.error for c in choice.values()), _optimum(layers, math.floor(target * weights))
        assert found <= best * 1.25 + 1e-12, (fraction, found, best)


def test_a_larger_budget_never_gives_a_larger_error():
    layers = _layers(3, n_layers=6)
    low, high = reachable(layers, 1000)
    errors = [sum(c.error for c in allocate(layers, 1000, low + f * (high - low)).values())
              for f in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert errors == sorted(errors, reverse=True)


def test_dominated_candidates_are_never_chosen():
    better = Candidate(3, 0, 100, 1.0)
    worse = Candidate(3, 16, 120, 2.0)  # more storage and more error
    assert efficient([worse, better]) == [better]
    assert allocate({"a": [worse, better, Candidate(2, 0, 60, 5.0)]}, 100, 1.2)["a"] == better


def test_budgets_outside_the_reachable_range_name_it():
    layers = _layers(0)
    low, high = reachable(layers, 1000)
    for target in (low - 0.5, high + 0.5):
        with pytest.raises(BudgetError, match=r"--target-bpw \S+ is outside what this model's layers can store: "
                                              r"\d+\.\d\d to \d+\.\d\d bits per weight"):
            allocate(layers, 1000, target)
