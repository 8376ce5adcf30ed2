"""Bits and salient columns per layer under a bit budget (``--target-bpw``): a multiple-choice knapsack.

Each quantized linear layer has candidate settings (bits, k), each with its exact storage in bits
(:func:`quikft.bits.layer_bits`) and a measured error. :func:`allocate` picks one candidate per
layer so that the summed error is as small as it can find while the summed storage never exceeds
the budget (``target_bpw`` × the layers' weights).

How: only a layer's *efficient* candidates matter (no other candidate is both smaller and more
accurate), and of those the lower convex hull of error against bits. A Lagrange multiplier λ
prices a bit: each layer takes the hull point minimising ``error + λ·bits``; the smallest λ whose
choice fits is found by bisection. What that leaves of the budget is then spent greedily on the
upgrades with the best error saved per bit added that still fit (any efficient candidate, so
points between hull corners are reached too). The result fits by construction; the bisection is
what makes it near-optimal (exact at every budget a hull corner meets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class BudgetError(ValueError):
    """A budget no choice of candidates can meet; the message names the reachable range."""


@dataclass(frozen=True)
class Candidate:
    """One setting of one layer: its bits, salient columns, storage in bits and measured error."""

    bits: int
    k: int
    storage: int
    error: float


def efficient(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats in both storage and error, by increasing storage."""
    ordered = sorted(candidates, key=lambda c: (c.storage, c.error))
    kept: list[Candidate] = []
    for candidate in ordered:
        if not kept or candidate.error < kept[-1].error:
            kept.append(candidate)
    return kept


def _lower_hull(points: list[Candidate]) -> list[Candidate]:
    """The convex lower hull of efficient candidates (error against storage)."""
    hull: list[Candidate] = []
    for point in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def _cross(a: Candidate, b: Candidate, c: Candidate) -> float:
    return (b.storage - a.storage) * (c.error - a.error) - (b.error - a.error) * (c.storage - a.storage)


def reachable(layers: Mapping[str, Sequence[Candidate]], weights: int) -> tuple[float, float]:
    """The smallest and largest bits per weight the candidates allow (every layer at its smallest,
    every layer at its largest)."""
    low = sum(min(c.storage for c in cands) for cands in layers.values())
    high = sum(max(c.storage for c in cands) for cands in layers.values())
    return low / weights, high / weights


def allocate(layers: Mapping[str, Sequence[Candidate]], weights: int, target_bpw: float) -> dict[str, Candidate]:
    """One candidate per layer, summed storage <= ``target_bpw * weights``, summed error small."""
    low, high = reachable(layers, weights)
    if not low <= target_bpw <= high:
        raise BudgetError(f"--target-bpw {target_bpw:g} is outside what this model's layers can store: "
                          f"{math.ceil(low * 100) / 100:.2f} to {math.floor(high * 100) / 100:.2f} bits per weight")
    budget = math.floor(target_bpw * weights)
    options = {name: efficient(cands) for name, cands in layers.items()}
    hulls = {name: _lower_hull(points) for name, points in options.items()}
    choice = _bisect(hulls, budget)
    return _spend(options, choice, budget)


def _pick(hulls: Mapping[str, list[Candidate]], price: float) -> dict[str, Candidate]:
    return {name: min(hull, key=lambda c: (c.error + price * c.storage, c.storage)) for name, hull in hulls.items()}


def _total(choice: Mapping[str, Candidate]) -> int:
    return sum(c.storage for c in choice.values())


def _bisect(hulls: Mapping[str, list[Candidate]], budget: int) -> dict[str, Candidate]:
    """The choice at the smallest price per bit whose storage fits the budget."""
    cheapest = {name: hull[0] for name, hull in hulls.items()}
    if _total(cheapest) > budget:  # unreachable after the range check, kept as a guard
        raise BudgetError("the budget is below the smallest candidates")
    if _total(_pick(hulls, 0.0)) <= budget:
        return _pick(hulls, 0.0)
    low, high = 0.0, 1.0
    while _total(_pick(hulls, high)) > budget:
        high *= 2
        if high > 1e300:
            return cheapest
    for _ in range(200):  # the price's floating-point precision is reached well before
        middle = (low + high) / 2
        if _total(_pick(hulls, middle)) <= budget:
            high = middle
        else:
            low = middle
        if high - low <= 1e-12 * high:
            break
    return _pick(hulls, high)


def _spend(options: Mapping[str, list[Candidate]], choice: dict[str, Candidate], budget: int
           ) -> dict[str, Candidate]:
    """Upgrade layers while the budget allows, best error saved per added bit first."""
    choice = dict(choice)
    left = budget - _total(choice)
    while True:
        best, best_rate = None, 0.0
        for name, current in choice.items():
            for candidate in options[name]:
                added = candidate.storage - current.storage
                if 0 < added <= left and candidate.error < current.error:
                    rate = (current.error - candidate.error) / added
                    if rate > best_rate:
                        best, best_rate = (name, candidate), rate
        if best is None:
            return choice
        name, candidate = best
        left -= candidate.storage - choice[name].storage
        choice[name] = candidate
