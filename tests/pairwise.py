"""A small deterministic pairwise (all-pairs) test-set generator for the option x path matrix.

`pairwise_rows(factors, full=..., exclude=...)` returns rows (dicts) such that
- every combination of the `full` factors appears (their whole product), and
- every pair of values of any two factors appears in at least one row,
- except the pairs in `exclude` (values that do not combine), which no row holds.

Greedy, in the manner of AETG: the rows of the full product come first and, one after the
other, take the values of the remaining factors that cover the most pairs not yet covered;
then, while pairs remain, a candidate row is grown around each uncovered pair (the other
factors one at a time, each taking the value that covers the most) and the one covering the
most pairs is added. Ties go to the earlier value in each factor's list (and the earlier pair),
so the same factors always give the same rows.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

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


def _excluded(exclude: Sequence[Pair]) -> set:
    """Both orders of each excluded pair."""
    return {p for a, va, b, vb in exclude for p in ((a, va, b, vb), (b, vb, a, va))}


def _allowed(row: Dict[str, object], excluded: set) -> bool:
    return not any((a, row[a], b, row[b]) in excluded for a, b in itertools.combinations(list(row), 2))


def pairwise_rows(factors: Dict[str, Sequence], full: Sequence[str] = (),
                  exclude: Sequence[Pair] = ()) -> List[Dict[str, object]]:
    """Rows covering the full product of `full` (but its excluded combinations) and all pairs of
    all factors but the `exclude` pairs (see module doc)."""
    names = list(factors)
    rest = [n for n in names if n not in full]
    excluded = _excluded(exclude)
    uncovered = all_pairs(factors) - excluded
    rows: List[Dict[str, object]] = []
    for combo in itertools.product(*(factors[n] for n in full)):
        row = dict(zip(full, combo))
        if not _allowed(row, excluded):
            continue
        for name in rest:  # one factor at a time: the value adding the most uncovered pairs (the first of equals)
            values = [v for v in factors[name] if _allowed({**row, name: v}, excluded)]
            row[name] = max(values, key=lambda value, name=name, row=row: _gain(row, name, value, uncovered))
        row = {n: row[n] for n in names}
        uncovered -= _pairs(row, names)
        rows.append(row)
    def position(pair: Pair) -> Tuple[int, int, int, int]:
        a, va, b, vb = pair
        return names.index(a), factors[a].index(va), names.index(b), factors[b].index(vb)

    while uncovered:  # per uncovered pair, a row filled greedily around it; the one covering the most
        best, best_gain = None, -1
        for a, va, b, vb in sorted(uncovered, key=position):
            row = {a: va, b: vb}
            for name in names:
                if name not in row:
                    values = [v for v in factors[name] if _allowed({**row, name: v}, excluded)]
                    row[name] = max(values, key=lambda value, name=name, row=row: _gain(row, name, value, uncovered))
            row = {n: row[n] for n in names}
            gain = len(_pairs(row, names) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        uncovered -= _pairs(best, names)
        rows.append(best)
    return rows
