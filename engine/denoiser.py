"""The TiUE denoiser composed from a diffusers UNet's own submodules.

Encoder (conv_in, down_blocks, mid_block) runs once on z_T at t_0; the decoder (up_blocks and the
output head) runs for all T timesteps as one batch of T*B rows, step-major; the DDIM chain is folded
into constants (or stepped, for non-linear scheduler configs).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn

from engine.errors import ModelLoadError
from engine.schedule import DDIMChain

Skips = tuple[torch.Tensor, ...]


def check_unet_supported(unet: UNet2DConditionModel) -> None:
    """TiUE students are plain text-conditioned UNets; refuse extras we would silently drop."""
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type,
        "addition_embed_type": cfg.addition_embed_type,
        "encoder_hid_dim_type": cfg.encoder_hid_dim_type,
    }
    bad = [f"{k}={v!r}" for k, v in unsupported.items() if v is not None]
    if bad:
        raise ModelLoadError(f"unsupported UNet config for TiUE: {', '.join(bad)}")


def time_embedding(unet: UNet2DConditionModel, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Time embeddings [N, D] for N timesteps, as the UNet computes them."""
    emb = unet.time_proj(timesteps).to(dtype=dtype)
    emb = unet.time_embedding(emb)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def run_encoder(
    unet: UNet2DConditionModel, sample: torch.Tensor, emb: torch.Tensor, states: torch.Tensor
) -> tuple[torch.Tensor, Skips]:
    """conv_in + down_blocks + mid_block: the mid feature and the skip features."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    sample = unet.conv_in(sample)
    skips: Skips = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=states)
        else:
            sample = unet.mid_block(sample, emb)
    return sample, skips


def run_decoder(
    unet: UNet2DConditionModel, sample: torch.Tensor, skips: Skips, emb: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """up_blocks + output head: the model output (noise prediction) for each row."""
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=states
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)
    if unet.conv_norm_out is not None:
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
    return unet.conv_out(sample)


def _tile(x: torch.Tensor, times: int) -> torch.Tensor:
    """[B, ...] -> [times*B, ...], step-major (all of copy 0, then copy 1, ...)."""
    return x.unsqueeze(0).expand(times, *x.shape).reshape(times * x.shape[0], *x.shape[1:])


class TiUEDenoiser(nn.Module):
    """(z_T, prompt states) -> z_0 in one encoder pass and one batched decoder pass."""

    def __init__(
        self, unet: UNet2DConditionModel, chain: DDIMChain, scheduler_config: dict[str, Any] | None = None
    ):
        super().__init__()
        check_unet_supported(unet)
        self.unet = unet
        self.chain = chain
        self.scheduler_config = dict(scheduler_config or {})
        if not chain.linear and scheduler_config is None:
            raise ValueError("a non-linear chain needs the scheduler config for the step loop")
        self.timesteps: torch.Tensor
        self.register_buffer("timesteps", torch.tensor(chain.timesteps, dtype=torch.long), persistent=False)

    def eps(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Model outputs for every step, [T, B, C, H, W], from one encoder and one decoder pass."""
        steps, batch = self.chain.steps, z_t.shape[0]
        # .to(): the buffer follows the module, but callers may move only the UNet to the device
        emb = time_embedding(self.unet, self.timesteps.to(z_t.device), z_t.dtype)  # [T, D]
        enc_emb = emb[:1].expand(batch, emb.shape[1])
        mid, skips = run_encoder(self.unet, z_t, enc_emb, states)
        dec_emb = emb.unsqueeze(1).expand(steps, batch, emb.shape[1]).reshape(steps * batch, emb.shape[1])
        out = run_decoder(
            self.unet, _tile(mid, steps), tuple(_tile(s, steps) for s in skips), dec_emb, _tile(states, steps)
        )
        return out.view(steps, batch, *out.shape[1:])

    def forward(
        self, z_t: torch.Tensor, states: torch.Tensor, return_eps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """z_0; with return_eps also the per-step outputs [T, B, ...] (training uses them)."""
        outputs = self.eps(z_t, states)
        z_0 = self.chain.fold(z_t, outputs) if self.chain.linear else self.step_loop(z_t, outputs)
        return (z_0, outputs) if return_eps else z_0

    def step_loop(self, z_t: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The DDIM chain stepped by the scheduler itself: the fallback for non-linear configs."""
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.chain.steps)
        z = z_t
        for i, t in enumerate(scheduler.timesteps):
            z = scheduler.step(outputs[i], t, z, eta=0.0).prev_sample
        return z
