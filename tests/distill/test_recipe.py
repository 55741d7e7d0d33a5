"""The reproduction command, end to end at toy length: every stage runs in order on real (tiny-step)
training, the shipped folder is a pipeline the engine serves, and a rerun resumes from checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from distill.__main__ import main
from distill.ship import JUDGE_PATH
from distill.student import Cycle, train_student
from engine.config import EngineConfig
from engine.pipeline import load_pipeline
from engine.types import GenerationRequest

pytestmark = pytest.mark.slow  # every stage, even at toy length, is ~50 s


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("recipe")
    work, out = root / "work", root / "model"
    common = ["--workdir", str(work), "--steps", "2", "--batch", "4", "--n", "64", "--seed", "3"]
    common += ["--eval-prompts", "2", "--threads", "1", "--fake-warmup", "2"]
    package_judge = _digest(JUDGE_PATH)
    main(["all", *common, "--out", str(out)])
    assert _digest(JUDGE_PATH) == package_judge, "a run shipping elsewhere replaced the package's judge"
    return work, out, common


def test_all_stages_leave_their_outputs(recipe: tuple[Path, Path, list[str]]) -> None:
    work, out, _ = recipe
    for part in ("tokenizer/vocab.json", "vae/model", "latents.pt", "judge/judge.safetensors"):
        assert (work / part).exists(), part
    for variant in ("regress", "vsd_kl", "vsd"):
        assert (work / "student" / variant / "unet" / "config.json").is_file(), variant
    rows = json.loads((work / "eval" / "results.json").read_text())["rows"]
    assert any("VSD + KL" in name for name in rows) and any("no KL" in name for name in rows)
    assert (work / "eval" / "grid.png").is_file()
    assert (out.with_name(out.name + "-judge.safetensors")).is_file()


def test_shipped_folder_is_served_by_the_engine(recipe: tuple[Path, Path, list[str]]) -> None:
    _, out, _ = recipe
    pipe = load_pipeline(EngineConfig(model_dir=out, threads=1))
    result = pipe.generate([GenerationRequest("a red circle on a blue background", 0, 64, 64)])
    assert result.images[0].pixels.shape == (64, 64, 3)
    assert pipe.info.steps == 4
    assert [d.value for d in pipe.info.decoders] == ["full", "tiny"]  # `all` ends with tiny-decoder --out


def test_rerun_resumes_from_the_checkpoint(
    recipe: tuple[Path, Path, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    work, _, common = recipe
    ckpt = work / "student" / "regress" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    with caplog.at_level(logging.INFO):
        main(["student", *common, "--variant", "regress", "--steps", "3"])
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    assert torch.load(ckpt, weights_only=False)["step"] == 3  # one more step, not three from scratch


def test_learning_rate_cycles_run_in_order(recipe: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    work, _, _ = recipe
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("ckpt.pt", "eval"))
    cycles = (Cycle(2, 1e-4), Cycle(2, 3e-5, pixel_weight=1.0, edge_weight=2.0))
    train_student(copy, "regress", cycles=cycles, batch=4, seed=3, n_targets=64)
    ckpt = torch.load(copy / "student" / "regress" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4
    # the last step (global 3) ran in the second cycle, at its own rate: a restart, not one long anneal
    assert ckpt["opt"]["param_groups"][0]["lr"] == pytest.approx(cycles[1].lr_at(1))
