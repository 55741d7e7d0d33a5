"""The prompt-embedding cache (engine.prompt_cache): exact, bounded, LRU, counted, off at 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import EngineConfig, GenerationRequest
from engine.pipeline import TiUEPipeline, load_pipeline
from engine.prompt_cache import PromptCache


def _req(prompt: str, seed: int) -> GenerationRequest:
    return GenerationRequest(prompt, seed, 64, 64)


@pytest.fixture(scope="module")
def cached(tiny_model_dir: Path) -> TiUEPipeline:
    return load_pipeline(EngineConfig(tiny_model_dir, max_batch_size=4, prompt_cache_size=8))


@pytest.fixture(scope="module")
def uncached(tiny_model_dir: Path) -> TiUEPipeline:
    return load_pipeline(EngineConfig(tiny_model_dir, max_batch_size=4, prompt_cache_size=0))


def _pixels(pipe: TiUEPipeline, requests: list[GenerationRequest]) -> list[np.ndarray]:
    return [im.pixels for im in pipe.generate(requests).images]


def test_the_same_pixels_with_and_without_the_cache(cached: TiUEPipeline, uncached: TiUEPipeline) -> None:
    hits, misses = cached.prompt_cache.stats()
    batches = [
        [_req("a red circle", 1), _req("a blue square", 2)],  # both missed
        [_req("a red circle", 3), _req("a blue square", 4)],  # both hit
        [_req("a green star", 5), _req("a red circle", 6), _req("a green star", 7)],  # one missed, one hit
    ]
    for batch in batches:
        for got, want in zip(_pixels(cached, batch), _pixels(uncached, batch), strict=True):
            assert np.array_equal(got, want)
    assert cached.prompt_cache.stats() == (hits + 3, misses + 3)
    assert uncached.prompt_cache.stats() == (0, 0) and len(uncached.prompt_cache) == 0


def test_warm_up_neither_reads_nor_fills_it(cached: TiUEPipeline) -> None:
    before, size = cached.prompt_cache.stats(), len(cached.prompt_cache)
    cached.warmup()
    assert cached.prompt_cache.stats() == before and len(cached.prompt_cache) == size


def _encoder(calls: list[int]) -> object:
    def encode(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[0])
        return ids.float().unsqueeze(-1).expand(-1, -1, 3) * 2  # [M, L] -> [M, L, 3]

    return encode


def test_bounded_in_entries_least_recently_used_first() -> None:
    cache, calls = PromptCache(2), []
    encode = _encoder(calls)
    for prompt in ([1, 2], [3, 4], [1, 2], [5, 6]):  # [3, 4] was used least recently when [5, 6] came
        out = cache.encode(torch.tensor([prompt]), encode)  # type: ignore[arg-type]
        assert torch.equal(out[0, :, 0], torch.tensor(prompt, dtype=torch.float32) * 2)
    assert len(cache) == 2 and calls == [1, 1, 1]
    cache.encode(torch.tensor([[1, 2], [5, 6]]), encode)  # type: ignore[arg-type]
    assert calls == [1, 1, 1] and cache.stats() == (3, 3)
    cache.encode(torch.tensor([[3, 4]]), encode)  # type: ignore[arg-type]
    assert calls == [1, 1, 1, 1]


def test_a_batch_encodes_each_missing_prompt_once_and_keeps_copies() -> None:
    cache, calls = PromptCache(4), []
    ids = torch.tensor([[7, 8], [9, 9], [7, 8], [7, 8]])  # a padded batch repeats its last prompt
    out = cache.encode(ids, _encoder(calls))  # type: ignore[arg-type]
    assert calls == [2] and cache.stats() == (0, 2)
    assert torch.equal(out, ids.float().unsqueeze(-1).expand(-1, -1, 3) * 2)
    out.zero_()  # what the encoder returned may be reused (a CUDA graph's output): the cache kept copies
    again = cache.encode(ids[:1], _encoder(calls))  # type: ignore[arg-type]
    assert calls == [2] and again[0, 0, 0].item() == 14.0


def test_size_zero_is_off() -> None:
    cache, calls = PromptCache(0), []
    cache.encode(torch.tensor([[1, 2], [1, 2]]), _encoder(calls))  # type: ignore[arg-type]
    cache.encode(torch.tensor([[1, 2], [1, 2]]), _encoder(calls))  # type: ignore[arg-type]
    assert calls == [2, 2] and len(cache) == 0 and cache.stats() == (0, 0)
    with pytest.raises(ValueError, match="0 or more"):
        PromptCache(-1)
