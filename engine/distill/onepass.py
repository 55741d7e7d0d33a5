"""The TiUE one-pass student forward, for training and evaluation.

Uses the engine's `TiUEDenoiser`/`DDIMChain` when they are importable, so the student is trained
through exactly the code that serves it; otherwise a local equivalent built from the same UNet
submodules (encoder once at t_0, all T decoders in one batched pass, DDIM folded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn

log = logging.getLogger(__name__)

OnePassFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def folded_chain(scheduler_config: dict, steps: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(timesteps, S, E): eta-0 DDIM from z_T is z_0 = S*z_T + sum_i E_i*eps_i."""
    sched = DDIMScheduler.from_config(scheduler_config)
    if sched.config.clip_sample or sched.config.thresholding or sched.config.prediction_type != "epsilon":
        raise ValueError("the folded chain needs an epsilon DDIM config without clipping or thresholding")
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    final = ac.new_tensor(1.0) if sched.config.set_alpha_to_one else ac[0]
    stride = sched.config.num_train_timesteps // steps
    a_coef, b_coef = [], []
    for t in sched.timesteps.tolist():
        a_t = ac[t]
        a_p = ac[t - stride] if t - stride >= 0 else final
        a_coef.append(torch.sqrt(a_p / a_t))
        b_coef.append(torch.sqrt(1 - a_p) - torch.sqrt(a_p) * torch.sqrt(1 - a_t) / torch.sqrt(a_t))
    s = torch.tensor(1.0, dtype=torch.float64)
    e = []
    for i in reversed(range(steps)):
        e.append(b_coef[i] * s)
        s = s * a_coef[i]
    return sched.timesteps.clone(), float(s), torch.stack(e[::-1]).float()


class LocalOnePass(nn.Module):
    """z_T -> (z_0, eps [T, B, C, H, W]); the same math as engine.denoiser.TiUEDenoiser."""

    def __init__(self, unet: UNet2DConditionModel, scheduler_config: dict, steps: int = 4) -> None:
        super().__init__()
        self.unet: Any = unet
        self.timesteps: torch.Tensor
        self.eps_coefs: torch.Tensor
        timesteps, s, e = folded_chain(scheduler_config, steps)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.start_coef = s
        self.register_buffer("eps_coefs", e, persistent=False)

    def _temb(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.unet.time_embedding(self.unet.time_proj(t).to(dtype))

    def forward(self, z_t: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, b, steps = self.unet, z_t.shape[0], len(self.timesteps)
        temb = self._temb(self.timesteps[:1].expand(b), z_t.dtype)
        h = u.conv_in(z_t)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=temb, encoder_hidden_states=states)
            else:
                h, res = block(hidden_states=h, temb=temb)
            skips += res
        h = u.mid_block(h, temb, encoder_hidden_states=states)
        # Decoders: tile features and prompt states T times, step-major.
        h = h.repeat(steps, 1, 1, 1)
        skips = tuple(s.repeat(steps, 1, 1, 1) for s in skips)
        states_t = states.repeat(steps, 1, 1)
        temb = self._temb(self.timesteps.repeat_interleave(b), z_t.dtype)
        for block in u.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if getattr(block, "has_cross_attention", False):
                h = block(
                    hidden_states=h, temb=temb, res_hidden_states_tuple=res, encoder_hidden_states=states_t
                )
            else:
                h = block(hidden_states=h, temb=temb, res_hidden_states_tuple=res)
        h = u.conv_out(u.conv_act(u.conv_norm_out(h)))
        eps = h.view(steps, b, *h.shape[1:])
        z0 = self.start_coef * z_t + (self.eps_coefs.view(steps, 1, 1, 1, 1).to(eps.dtype) * eps).sum(0)
        return z0, eps


def one_pass(unet: UNet2DConditionModel, scheduler_config: dict, steps: int = 4) -> nn.Module:
    """The engine's TiUEDenoiser when available (same code path as serving), else LocalOnePass.

    Either way the returned module maps (z_T, states) -> (z_0, eps[T, B, C, H, W]).
    """
    try:
        from engine.denoiser import TiUEDenoiser
        from engine.schedule import DDIMChain
    except ImportError:
        log.info("engine.denoiser not available; using the local one-pass implementation")
        return LocalOnePass(unet, scheduler_config, steps)
    chain = DDIMChain.from_scheduler_config(dict(scheduler_config), steps)
    chain.require_linear("training the one-pass student")
    return _EngineAdapter(TiUEDenoiser(unet, chain))


class _EngineAdapter(nn.Module):
    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, z_t: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0, eps = self.denoiser(z_t, states, return_eps=True)
        return z0, eps
