"""TIUE_TORCH_COMPILE and its companions as settings, and the warm-up as a metric."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.types import TorchCompile
from service.settings import Settings
from tests.service.fakes import FakeEngine, serve


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("true", TorchCompile.DEFAULT),  # the setting was a boolean once
        ("1", TorchCompile.DEFAULT),
        ("false", TorchCompile.OFF),
        ("0", TorchCompile.OFF),
        ("off", TorchCompile.OFF),
        ("Max-Autotune", TorchCompile.MAX_AUTOTUNE),
        ("reduce-overhead", TorchCompile.REDUCE_OVERHEAD),
        ("auto", TorchCompile.AUTO),
        ("AOT", TorchCompile.AOT),
    ],
)
def test_torch_compile_modes_and_the_old_booleans(
    monkeypatch: pytest.MonkeyPatch, value: str, mode: TorchCompile
) -> None:
    monkeypatch.setenv("TIUE_TORCH_COMPILE", value)
    assert Settings().torch_compile is mode
    assert Settings().engine_config().torch_compile is mode


def test_auto_is_the_default_and_the_prompt_cache_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().torch_compile is TorchCompile.AUTO
    assert Settings().engine_config().prompt_cache_size == 1024
    monkeypatch.setenv("TIUE_PROMPT_CACHE_SIZE", "0")
    assert Settings().engine_config().prompt_cache_size == 0
    monkeypatch.setenv("TIUE_PROMPT_CACHE_SIZE", "-1")
    with pytest.raises(ValidationError, match="prompt_cache_size"):
        Settings()


def test_an_unknown_mode_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIUE_TORCH_COMPILE", "fast")
    with pytest.raises(ValidationError, match="reduce-overhead"):
        Settings()


def test_warm_buckets_sizes_and_cache_reach_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIUE_TORCH_COMPILE", "default")
    monkeypatch.setenv("TIUE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("TIUE_WARM_BATCH_SIZES", "1, 3")
    monkeypatch.setenv("TIUE_WARM_SIZES", "512,768x512")
    monkeypatch.setenv("TIUE_COMPILE_CACHE_DIR", str(tmp_path))
    config = Settings().engine_config()
    assert config.warm_batch_sizes == (1, 3) and config.batch_buckets() == (1, 3, 8)
    assert config.warm_sizes == ((512, 512), (768, 512))
    assert config.compile_cache_dir == tmp_path


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TIUE_WARM_BATCH_SIZES", "2,16", "within 1..max_batch_size"),
        ("TIUE_WARM_SIZES", "512x", "must look like 512 or 512x768"),
    ],
)
def test_bad_warm_settings_say_what_to_change(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


async def test_the_warm_up_is_timed_and_exported() -> None:
    engine = FakeEngine()
    async with serve(engine) as (client, _):
        metrics = (await client.get("/metrics")).text
    assert engine.warmed
    line = next(m for m in metrics.splitlines() if m.startswith('tiue_warmup_seconds{model="fake-tiue"}'))
    assert float(line.split()[-1]) >= 0
