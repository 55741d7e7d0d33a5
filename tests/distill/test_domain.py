"""The synthetic domain: deterministic from a seed, and captions say exactly what is drawn."""

from __future__ import annotations

import numpy as np

from distill.domain import (
    ATTRIBUTES,
    COLORS,
    WORDS,
    make_dataset,
    sample_scene,
    specified,
    training_caption,
)
from distill.tokenizer import build_vocab


def test_same_seed_same_data_other_seed_other_data() -> None:
    scenes_a, images_a = make_dataset(16, seed=3)
    scenes_b, images_b = make_dataset(16, seed=3)
    scenes_c, images_c = make_dataset(16, seed=4)
    assert scenes_a == scenes_b and np.array_equal(images_a, images_b)
    assert scenes_a != scenes_c and not np.array_equal(images_a, images_c)
    assert images_a.shape == (16, 64, 64, 3) and images_a.dtype == np.uint8


def test_full_caption_names_every_attribute() -> None:
    scenes, _ = make_dataset(50, seed=0)
    for scene in scenes:
        assert specified(scene.caption()) == {a: getattr(scene, a) for a in ATTRIBUTES}
        assert scene.color != scene.background


def test_training_captions_only_drop_phrases() -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = sample_scene(rng)
        said = specified(training_caption(scene, rng))
        assert said["shape"] == scene.shape and said["color"] == scene.color
        assert all(getattr(scene, a) == v for a, v in said.items())


def test_pixels_show_the_caption_colours() -> None:
    scenes, images = make_dataset(40, seed=7)
    palette = np.array(list(COLORS.values()), dtype=float)
    names = list(COLORS)
    for scene, img in zip(scenes, images, strict=True):
        corner = img[:2, :2].reshape(-1, 3).mean(0)
        assert names[int(np.abs(palette - corner).sum(1).argmin())] == scene.background
        pixels = img.reshape(-1, 3).astype(float)
        nearest = np.abs(pixels[:, None] - palette[None]).sum(2).argmin(1)
        assert (nearest == names.index(scene.color)).sum() > 40  # the shape covers > 40 pixels


def test_each_domain_word_is_one_token() -> None:
    vocab, merges = build_vocab()
    assert all(f"{w}</w>" in vocab for w in WORDS)
    assert len(vocab) < 1000 and len(merges) < len(vocab)
