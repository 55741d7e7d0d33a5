"""`ship` writes only where it is told: no default folder inside an installed package."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.__main__ import main
from distill.ship import judge_beside


@pytest.mark.parametrize("stage", ["ship", "all"])
def test_shipping_without_out_is_refused(
    stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([stage, "--workdir", str(tmp_path)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written before the refusal"


def test_the_judge_lands_beside_the_named_folder(tmp_path: Path) -> None:
    assert judge_beside(tmp_path / "model") == tmp_path / "model-judge.safetensors"
