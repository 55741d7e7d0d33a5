"""A minimal LoRA for the fake-score model, so distillation needs no extra dependency (peft).

Wraps every nn.Linear and nn.Conv2d of a module in place: y = base(x) + (alpha/r) * up(down(x)),
with `up` zero-initialised so the wrapped model starts exactly equal to the base (the teacher).
"""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        r = min(rank, base.in_features, base.out_features)
        self.down = nn.Linear(base.in_features, r, bias=False)
        self.up = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))


class LoRAConv2d(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        r = min(rank, base.in_channels, base.out_channels)
        self.down = nn.Conv2d(
            base.in_channels,
            r,
            base.kernel_size,  # type: ignore[arg-type]
            base.stride,  # type: ignore[arg-type]
            base.padding,  # type: ignore[arg-type]
            base.dilation,  # type: ignore[arg-type]
            bias=False,
        )
        self.up = nn.Conv2d(r, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))


def add_lora(module: nn.Module, rank: int = 16, alpha: float = 16.0) -> list[torch.Tensor]:
    """Freeze `module`, wrap its Linear/Conv2d layers, and return the new trainable parameters."""
    module.requires_grad_(False)
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear | nn.Conv2d) and not isinstance(parent, LoRALinear | LoRAConv2d)
    ]
    params: list[torch.Tensor] = []
    for parent, name, child in targets:
        wrapped = (
            LoRALinear(child, rank, alpha) if isinstance(child, nn.Linear) else LoRAConv2d(child, rank, alpha)
        )
        setattr(parent, name, wrapped)
        params += [wrapped.down.weight, wrapped.up.weight]
    return params
