"""Shared fixtures: tiny random-init pipeline folders in both UNet shapes, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.tiny_model import add_tiny_decoder, build_tiny_pipeline
from tests.support.tiny_safety import add_aimed_safety_checker

# One intra-op thread: the tiny models gain nothing from more, and OpenMP threads that spin-wait
# collapse (seconds per image instead of milliseconds) when a server subprocess shares the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Engine caches (compiled graphs, the file-hash memo) go to a per-run folder, never the user's cache."""
    os.environ["TIUE_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiue-cache"))


@pytest.fixture(scope="session", params=["sd15", "sd21"])
def tiny_model_dir_any(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny pipeline folder, once per UNet shape (SD1.5-like and SD2.1-base-like)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD1.5-shaped pipeline folder (for tests that need one model, not both shapes)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd15-main"), "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_decoder_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.5-shaped pipeline folder with a `vae_tiny/` AutoencoderTiny (scaling factor 0.75, so
    a wrong latent scaling shows)."""
    model = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd15-vae-tiny"), "sd15", seed=0)
    add_tiny_decoder(model, scaling_factor=0.75)
    return model


@pytest.fixture(scope="session")
def safety_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.5-shaped pipeline folder with a `safety_checker/` aimed at known images
    (tests/support/tiny_safety.py: FLAGGED_SEED, CARE_SEED)."""
    model = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd15-safety"), "sd15", seed=0)
    add_aimed_safety_checker(model)
    return model
