"""Fixtures for the service tests; the helpers themselves live in fakes.py."""

from __future__ import annotations

import pytest
from fakes import FakeEngine

from service.settings import Settings

SETTINGS_FIELDS = [name.upper() for name in Settings.model_fields]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the developer's shell must not leak into tests."""
    for name in SETTINGS_FIELDS:
        monkeypatch.delenv(f"TIUE_{name}", raising=False)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()
