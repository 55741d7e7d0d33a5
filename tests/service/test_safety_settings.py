"""TIUE_SAFETY_CHECKER: an enum read from the environment (or --safety-checker), forwarded to the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fakes import make_settings
from pydantic import ValidationError

from engine.errors import ModelLoadError
from engine.types import SafetyCheck
from service.app import create_app
from service.settings import Settings


def test_auto_by_default_and_forwarded_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().engine_config().safety_checker is SafetyCheck.AUTO
    monkeypatch.setenv("TIUE_SAFETY_CHECKER", " ON ")
    assert Settings().engine_config().safety_checker is SafetyCheck.ON


def test_another_value_is_refused_naming_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIUE_SAFETY_CHECKER", "strict")
    with pytest.raises(ValidationError, match="'auto', 'on' or 'off'"):
        Settings()


async def test_on_without_a_checker_fails_the_start_naming_the_folder(tiny_model_dir: Path) -> None:
    failures: list[BaseException] = []
    app = create_app(make_settings(model_dir=tiny_model_dir, safety_checker="on"), on_fatal=failures.append)
    async with app.router.lifespan_context(app):
        async with asyncio.timeout(60):
            while app.state.tiue.failure is None:
                await asyncio.sleep(0.01)
    (failure,) = failures
    assert isinstance(failure, ModelLoadError)
    assert str(tiny_model_dir / "safety_checker") in str(failure) and "\n" not in str(failure)
