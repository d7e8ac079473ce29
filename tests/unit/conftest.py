from collections.abc import Iterator

import pytest

from tests.memory_store import MemoryStore


@pytest.fixture
def memory_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryStore]:
    """The plugin's commands, served from an in-memory store instead of the configured one."""
    store = MemoryStore()
    monkeypatch.setattr("pyabouts.ipam.stores.open_store", lambda ipam, timeout: store)
    yield store


@pytest.fixture(scope="module")
def monkeypatch_store() -> Iterator[MemoryStore]:
    """One store for many generated requests (hypothesis runs them in one test function)."""
    store = MemoryStore()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pyabouts.ipam.stores.open_store", lambda ipam, timeout: store)
        yield store


@pytest.fixture(autouse=True)
def no_host_flat_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's own flat files (the local cluster's installer writes one) are not the unit
    tests' input: the standard places are searched, and found empty."""
    monkeypatch.setattr("pyabouts.ipam.stores.flat_file.FLAT_FILE_PATHS", ())
