"""The fuzzers' store, made once for the module: real objects, then no workers (see `store.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.store import fuzz_store
from tests.tools.conftest import Seeded


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Seeded]:
    with fuzz_store(tmp_path_factory.mktemp("fuzz"), tiny_model) as seeded:
        yield seeded
