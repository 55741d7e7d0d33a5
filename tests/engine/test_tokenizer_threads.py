"""Counting tokens (the event loop, for admission) while the device thread tokenizes padded batches: the
embedded default model's fast tokenizer keeps mutable padding state, so sharing one instance fails."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest

from engine import EngineConfig
from engine.pipeline import TiUEPipeline, load_pipeline

PROMPTS = [
    "x",
    "a red circle",
    "a purple triangle and a small green star",
    "a large yellow ring on a blue square next to a small green star " * 3,  # over the window
]


@pytest.fixture(scope="module")
def default_pipeline() -> TiUEPipeline:
    return load_pipeline(EngineConfig())


@pytest.fixture
def fine_thread_switching() -> Iterator[None]:
    """Switch threads every 10 µs instead of 5 ms, so that calls interleave as on a busy server."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.slow
@pytest.mark.usefixtures("fine_thread_switching")
def test_counting_tokens_from_other_threads_never_breaks_padded_tokenization(
    default_pipeline: TiUEPipeline,
) -> None:
    pipe = default_pipeline
    expected = [pipe.count_tokens(p) for p in PROMPTS]
    window = pipe.info.max_prompt_tokens
    stop = time.monotonic() + 4.0
    failures: list[BaseException] = []
    counted: list[int] = []
    padded = 0

    def count() -> None:
        i = 0
        while time.monotonic() < stop and not failures:
            try:
                tokens = pipe.count_tokens(PROMPTS[i % len(PROMPTS)])
                if tokens != expected[i % len(PROMPTS)]:
                    raise AssertionError(f"{PROMPTS[i % len(PROMPTS)]!r}: {tokens} tokens")
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)
            counted.append(1)
            i += 1

    counters = [threading.Thread(target=count) for _ in range(2)]
    for thread in counters:
        thread.start()
    try:
        i = 0
        while time.monotonic() < stop and not failures:
            batch = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(3)]
            try:
                ids = pipe.tokenize(batch)  # what the device thread does for every batch
                assert tuple(ids.shape) == (3, window)
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)
            padded += 1
            i += 1
    finally:
        for thread in counters:
            thread.join()
    assert not failures, f"{len(failures)} failures in {padded} padded calls: {failures[0]!r}"
    assert padded > 100 and len(counted) > 100
