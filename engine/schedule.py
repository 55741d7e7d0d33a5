"""The DDIM chain of a TiUE student, folded into closed form where the scheduler config allows it.

With eta 0 and no clipping or thresholding every DDIM step is affine in (z, model_output), so the
whole T-step chain is ``z_0 = S * z_T + sum_i E_i * out_i``. The constants come from the
checkpoint's own scheduler config, never from a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from engine.errors import UnsupportedSchedulerError

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_scheduler(config: dict[str, Any], steps: int) -> DDIMScheduler:
    """A DDIM scheduler from any SD-family scheduler config (DDIM, PNDM, ...), set to `steps` steps."""
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def _nonlinear_reasons(config: Any) -> list[str]:
    reasons = []
    if config.clip_sample:
        reasons.append("clip_sample=True")
    if config.thresholding:
        reasons.append("thresholding=True")
    if config.prediction_type not in _PREDICTION_TYPES:
        reasons.append(f"prediction_type={config.prediction_type!r}")
    return reasons


def _step_coefficients(prediction_type: str, alpha: float, alpha_prev: float) -> tuple[float, float]:
    """(c, d) with DDIM(eta=0).step(out, t, z) == c * z + d * out for this prediction type."""
    sa, s1a = math.sqrt(alpha), math.sqrt(1.0 - alpha)
    sp, s1p = math.sqrt(alpha_prev), math.sqrt(1.0 - alpha_prev)
    if prediction_type == "epsilon":  # x0 = (z - s1a*eps)/sa
        return sp / sa, s1p - sp * s1a / sa
    if prediction_type == "v_prediction":  # x0 = sa*z - s1a*v, eps = sa*v + s1a*z
        return sp * sa + s1p * s1a, s1p * sa - sp * s1a
    # sample: x0 = out, eps = (z - sa*x0)/s1a
    return s1p / s1a, sp - s1p * sa / s1a


@dataclass(frozen=True)
class DDIMChain:
    """Timesteps of a T-step DDIM chain and, when it is linear, its folded constants."""

    timesteps: tuple[int, ...]
    prediction_type: str
    linear: bool
    start_coef: float  # S
    eps_coefs: tuple[float, ...]  # E_i, one per timestep
    nonlinear_reasons: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], steps: int) -> DDIMChain:
        if steps < 1:
            raise UnsupportedSchedulerError(f"steps must be at least 1, got {steps}")
        scheduler = make_scheduler(config, steps)
        cfg = scheduler.config
        timesteps = tuple(int(t) for t in scheduler.timesteps)
        reasons = _nonlinear_reasons(cfg)
        if reasons:
            return cls(timesteps, cfg.prediction_type, False, 1.0, (0.0,) * steps, tuple(reasons))
        alphas = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        stride = cfg.num_train_timesteps // steps
        coefs: list[tuple[float, float]] = []
        for t in timesteps:
            prev = t - stride
            alpha_prev = float(alphas[prev]) if prev >= 0 else final
            coefs.append(_step_coefficients(cfg.prediction_type, float(alphas[t]), alpha_prev))
        start = math.prod(c for c, _ in coefs)
        eps = [d * math.prod(c for c, _ in coefs[i + 1 :]) for i, (_, d) in enumerate(coefs)]
        return cls(timesteps, cfg.prediction_type, True, start, tuple(eps))

    def require_linear(self, why: str) -> None:
        if not self.linear:
            raise UnsupportedSchedulerError(
                f"the scheduler config is not linear ({', '.join(self.nonlinear_reasons)}), so the DDIM chain "
                f"cannot be folded into closed form, which {why} needs; set clip_sample=false and "
                "thresholding=false in scheduler/scheduler_config.json or use the torch backend's step loop"
            )

    def fold(self, z_t: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """z_0 from z_T [B,...] and the step-major model outputs [T, B, ...]."""
        coefs = torch.tensor(self.eps_coefs, dtype=outputs.dtype, device=outputs.device)
        coefs = coefs.view(-1, *([1] * (outputs.dim() - 1)))
        return self.start_coef * z_t + (coefs * outputs).sum(0)
