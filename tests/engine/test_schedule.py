"""The folded DDIM chain against the scheduler's own step loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from engine.errors import UnsupportedSchedulerError
from engine.schedule import DDIMChain
from tests.support.tiny_model import SD_SCHEDULER


def _scheduler_chain(config: dict, z: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(outputs.shape[0])
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.step(outputs[i], t, z, eta=0.0).prev_sample
    return z


def test_sd21_check_values() -> None:
    chain = DDIMChain.from_scheduler_config(SD_SCHEDULER, 4)
    assert chain.timesteps == (751, 501, 251, 1)
    assert chain.linear
    assert chain.start_coef == pytest.approx(4.2346, abs=1e-4)
    assert chain.eps_coefs == pytest.approx([-2.4919, -0.9249, -0.6568, -0.0121], abs=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_folded_chain_equals_scheduler_steps(
    prediction_type: str, steps: int, set_alpha_to_one: bool
) -> None:
    config = {**SD_SCHEDULER, "prediction_type": prediction_type, "set_alpha_to_one": set_alpha_to_one}
    chain = DDIMChain.from_scheduler_config(config, steps)
    g = torch.Generator().manual_seed(steps)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    outputs = torch.randn(steps, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    expected = _scheduler_chain(config, z, outputs)
    # the scheduler takes square roots of its float32 alphas; our constants are exact in float64
    torch.testing.assert_close(chain.fold(z, outputs), expected, rtol=1e-5, atol=1e-5)


def test_trailing_spacing_timesteps_come_from_config() -> None:
    chain = DDIMChain.from_scheduler_config(
        {**SD_SCHEDULER, "timestep_spacing": "trailing", "steps_offset": 0}, 4
    )
    assert chain.timesteps == (999, 749, 499, 249)


@pytest.mark.parametrize("flag", ["clip_sample", "thresholding"])
def test_nonlinear_configs_are_flagged(flag: str) -> None:
    chain = DDIMChain.from_scheduler_config({**SD_SCHEDULER, flag: True}, 4)
    assert not chain.linear
    assert any(flag in reason for reason in chain.nonlinear_reasons)
    with pytest.raises(UnsupportedSchedulerError, match=flag):
        chain.require_linear("ONNX export")
