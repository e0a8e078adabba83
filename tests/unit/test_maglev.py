"""Maglev tables (agent/maglev.py) against the paper's promises, computed from the table
itself: balance (section 3.4's round-robin fill), minimal disruption, one table whatever
order the backends arrive in, and literal tables an upgraded agent must still produce."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from agent import maglev


def names(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(n)]


def by_name(backends: list[str], m: int) -> list[str]:
    """The table with backend names in its entries: comparable across backend lists."""
    return [backends[i] for i in maglev.table(backends, m)]


@pytest.mark.parametrize(("n", "m"), [(1, 7), (2, 7), (3, 13), (4, 1021), (10, 1021),
                                      (37, 1021), (100, 1021), (1000, 1021), (6, 65521)])
def test_every_backend_gets_its_share_to_one_entry(n, m):
    """The fill takes turns, one entry per backend per round, until the table is full:
    every backend holds floor(M/N) or ceil(M/N) entries, never more, never fewer."""
    counts = Counter(maglev.table(names(n), m))
    assert set(counts) == set(range(n))
    assert sum(counts.values()) == m
    assert {m // n, -(-m // n)} >= set(counts.values())


@pytest.mark.parametrize(("n", "m"), [(3, 1021), (5, 1021), (10, 1021), (20, 4093),
                                      (40, 4093)])
def test_removing_one_backend_moves_its_entries_and_few_others(n, m):
    """With M at least 100 N (the paper's sizing) the removed backend's entries all move,
    and the survivors' entries that move as a side effect are about as many again: the
    paper bounds them by measurement only (each survivor keeps its own permutation; only
    the entries the later rounds contest change hands). Here at most 1.5 M/N, where the
    worst case of these tables is 1.03 M/N; modulo hashing would move (N-1)/N of all."""
    before_names = names(n)
    before = by_name(before_names, m)
    for gone in before_names:
        after = by_name([b for b in before_names if b != gone], m)
        assert gone not in after
        side_effect = sum(1 for old, new in zip(before, after, strict=True)
                          if old != gone and old != new)
        assert side_effect <= 1.5 * m / n, (gone, side_effect, m / n)
        # and a returning backend gets exactly its old entries back
        assert by_name(before_names, m) == before


def test_the_table_depends_on_the_backends_not_their_order():
    """Every node builds the same table whatever order its EndpointSlices arrived in."""
    backends = names(25)
    want = by_name(backends, 1021)
    shuffled = backends[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert by_name(shuffled, 1021) == want


def test_tables_are_what_earlier_agents_wrote():
    """Literal tables (computed once, never recomputed here): nodes running different
    agent versions during an upgrade must pick the same backend for a flow, so the hashes
    and the fill may never change without a new map layout."""
    assert maglev.table(["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"], 13) == \
        [1, 2, 0, 1, 0, 1, 2, 0, 0, 1, 2, 2, 0]
    assert maglev.table(["[fd00::1]:53", "10.1.2.3:53"], 7) == [1, 1, 0, 1, 0, 0, 1]


@pytest.mark.parametrize(("backends", "m", "error"), [
    (names(2), 1000, "not a prime"), (names(7), 7, "larger than 7")])
def test_sizes_that_cannot_make_a_table_are_refused(backends, m, error):
    with pytest.raises(ValueError, match=error):
        maglev.table(backends, m)
