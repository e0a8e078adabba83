"""Unit-test fixtures: no test passes while a fake kernel saw a broken invariant.

The agent's sync catches every error (it logs, counts and retries), so an InvariantBroken
raised by tests/fakes.py inside it would otherwise leave the test green."""
from __future__ import annotations

import pytest

from tests.fakes import FakeServiceMaps


@pytest.fixture(autouse=True)
def no_broken_invariant():
    FakeServiceMaps.broken_anywhere.clear()
    yield
    broken, FakeServiceMaps.broken_anywhere[:] = list(FakeServiceMaps.broken_anywhere), []
    if broken:
        pytest.fail(f"the fake kernel saw {len(broken)} broken invariant(s), the first: "
                    f"{broken[0]}", pytrace=False)
