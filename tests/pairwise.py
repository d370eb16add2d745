"""A small deterministic pairwise (all-pairs) test-set generator for the option x path matrix.

`pairwise_rows(factors, full=...)` returns rows (dicts) such that
- every combination of the `full` factors appears (their whole product), and
- every pair of values of any two factors appears in at least one row.

Greedy, in the manner of AETG: the rows of the full product come first and, one after the
other, take the values of the remaining factors that cover the most pairs not yet covered;
then, while pairs remain, the candidate row (over the whole product, in a fixed order) that
covers the most of them is added (counted for all candidates at once with NumPy). Ties go to the earlier value in each factor's list, so the
same factors always give the same rows.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import numpy as np

Pair = Tuple[str, object, str, object]


def _pairs(row: Dict[str, object], names: Sequence[str]) -> set:
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}


def _gain(row: Dict[str, object], name: str, value, uncovered: set) -> int:
    """Uncovered pairs that `name` = `value` would cover next to the values already in `row`."""
    return sum((a, row[a], name, value) in uncovered or (name, value, a, row[a]) in uncovered for a in row)


def all_pairs(factors: Dict[str, Sequence]) -> set:
    """Every pair of values of two different factors."""
    names = list(factors)
    return {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]}


def pairwise_rows(factors: Dict[str, Sequence], full: Sequence[str] = ()) -> List[Dict[str, object]]:
    """Rows covering the full product of `full` and all pairs of all factors (see module doc)."""
    names = list(factors)
    rest = [n for n in names if n not in full]
    uncovered = all_pairs(factors)
    rows: List[Dict[str, object]] = []
    for combo in itertools.product(*(factors[n] for n in full)):
        row = dict(zip(full, combo))
        for name in rest:  # one factor at a time: the value adding the most uncovered pairs (the first of equals)
            row[name] = max(factors[name], key=lambda value, name=name, row=row: _gain(row, name, value, uncovered))
        row = {n: row[n] for n in names}
        uncovered -= _pairs(row, names)
        rows.append(row)
    while uncovered:
        best = _best_row(factors, uncovered)
        uncovered -= _pairs(best, names)
        rows.append(best)
    return rows


def _best_row(factors: Dict[str, Sequence], uncovered: set) -> Dict[str, object]:
    """The row of the whole product (in itertools.product order, the first of equals) that covers
    the most `uncovered` pairs: the count per row is a sum of one 0/1 table per two factors,
    broadcast over the product in NumPy (the product of 8 factors has 300k rows)."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    count = np.zeros(sizes, np.int32)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        table = np.array([[(a, va, b, vb) in uncovered for vb in factors[b]] for va in factors[a]], np.int32)
        shape = [1] * len(names)
        shape[i], shape[j] = sizes[i], sizes[j]
        count += table.reshape(shape)
    index = np.unravel_index(int(np.argmax(count)), sizes)  # argmax: the first maximum in C (= product) order
    return {n: factors[n][k] for n, k in zip(names, index)}
