"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): a lookup table of
M entries per service port, filled from each backend's own permutation of the table.

Every node computes the same table from the same backends, whatever order they arrived
in, so a flow's hash picks the same backend whichever node it enters through; removing
one of N backends moves about 1/N of the table. Pure: no I/O."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

M_MIN, M_MAX = 7, 65521     # table sizes accepted: slot numbers are 16 bits


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _hash(text: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(),
                          "little")


def table(backends: Sequence[str], m: int) -> list[int]:
    """Entry i holds the index (into `backends`) of the backend owning table slot i.
    `backends` are stable names (address:port); m must be a prime larger than len()."""
    if not is_prime(m):
        raise ValueError(f"maglev table size {m} is not a prime")
    if not backends:
        return []
    if len(backends) >= m:
        raise ValueError(f"{len(backends)} backends need a table larger than {m}")
    # the paper's order-independence: permutations depend on the name alone, and ties
    # in the round-robin go by sorted name, not by arrival
    order = sorted(range(len(backends)), key=lambda i: backends[i])
    offsets = [_hash(backends[i], b"offset") % m for i in order]
    skips = [_hash(backends[i], b"skip") % (m - 1) + 1 for i in order]
    nexts = [0] * len(order)
    entry = [-1] * m
    filled = 0
    while True:
        for j, i in enumerate(order):
            c = (offsets[j] + nexts[j] * skips[j]) % m
            while entry[c] >= 0:
                nexts[j] += 1
                c = (offsets[j] + nexts[j] * skips[j]) % m
            entry[c] = i
            nexts[j] += 1
            filled += 1
            if filled == m:
                return entry
