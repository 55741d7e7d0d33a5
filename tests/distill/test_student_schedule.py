"""The student's learning-rate cycles (warm restarts) and its edge-weighted image loss."""

from __future__ import annotations

import pytest
import torch

from distill.student import RECIPES, WARMUP, Cycle, cycle_at, edge_weights


def test_a_cycle_warms_up_peaks_and_anneals_to_zero() -> None:
    cycle = Cycle(steps=1000, lr=1e-4)
    assert cycle.lr_at(0) == pytest.approx(1e-4 / WARMUP)
    assert cycle.lr_at(WARMUP - 1) > 0.97e-4  # the peak, barely annealed yet
    assert max(cycle.lr_at(i) for i in range(1000)) <= 1e-4
    assert cycle.lr_at(1000) == 0.0
    assert cycle.lr_at(500) == pytest.approx(0.5e-4)


def test_global_steps_map_onto_cycles_in_order() -> None:
    cycles = (Cycle(10, 1e-3), Cycle(20, 1e-4, pixel_weight=2.0))
    assert cycle_at(cycles, 0) == (cycles[0], 0)
    assert cycle_at(cycles, 9) == (cycles[0], 9)
    assert cycle_at(cycles, 10) == (cycles[1], 0)  # a restart: warm-up again from a small rate
    assert cycle_at(cycles, 29) == (cycles[1], 19)
    assert cycle_at(cycles, 30) == (cycles[1], 20)  # past the end: the last cycle's end (rate 0)


def test_recipes_add_up_to_their_steps() -> None:
    regress = RECIPES["regress"]
    assert regress.steps == sum(c.steps for c in regress.cycles) > 0
    assert all(c.lr > 0 and c.steps > 0 for r in RECIPES.values() for c in r.cycles)


def _square(size: int, half: int) -> torch.Tensor:
    img = torch.full((1, 3, size, size), -1.0)
    c = size // 2
    img[..., c - half : c + half, c - half : c + half] = 1.0
    return img


def test_edge_weights_are_one_on_flat_images_and_rise_on_outlines() -> None:
    flat = torch.zeros(2, 3, 16, 16)
    assert torch.equal(edge_weights(flat, 4.0), torch.ones(2, 1, 16, 16))
    w = edge_weights(_square(32, 6), 4.0)
    assert w.shape == (1, 1, 32, 32)
    assert w[0, 0, 0, 0] == 1.0 and w[0, 0, 16, 16] == 1.0  # background and the shape's inside
    assert w[0, 0, 16, 16 - 7 : 16 + 7].max() > 5.0  # across the outline
    assert w.mean().item() == pytest.approx(1 + 4.0, rel=1e-5)


def test_edge_weights_give_small_and_large_shapes_the_same_outline_weight() -> None:
    images = torch.cat([_square(64, 5), _square(64, 16)])
    w = edge_weights(images, 3.0)
    outline = (w - 1).sum(dim=(1, 2, 3))
    assert outline[0].item() == pytest.approx(outline[1].item(), rel=1e-5)
    assert (w[0] - 1).max() > (w[1] - 1).max()  # so each pixel of a small outline counts for more
