"""The engine's one size parser and one seed range, and what a request resolves into."""

from __future__ import annotations

import pytest

from engine.types import MAX_SEED, SEED_SPACE, BatchKey, Decoder, GenerationRequest, parse_size, random_seed


@pytest.mark.parametrize(("text", "size"), [("512x768", (512, 768)), ("64x64", (64, 64)), ("0x64", (0, 64))])
def test_a_size_is_width_x_height(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "512",  # a lone side is a square only where squares are asked for
        "512X768",  # the x is lowercase
        "512×768",
        " 512x768",
        "512x768 ",
        "512x768\n",
        "512 x 768",
        "0512x768",  # no leading zeros
        "0064x0064",
        "５１２x７６８",  # fullwidth digits, which int() takes
        "٥١٢x٧٦٨",  # Arabic-Indic digits, which str.isdigit() takes
        "512x-768",
        "+512x768",
        "512x768x2",
        "123456x64",  # more digits than any size has
        "",
        "x",
    ],
)
def test_anything_else_is_refused_saying_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="is not WIDTHxHEIGHT in pixels: it must look like 512x768"):
        parse_size(text)


def test_a_lone_side_is_a_square_where_asked_for() -> None:
    assert parse_size("512", square=True) == (512, 512)
    assert parse_size("512x768", square=True) == (512, 768)
    with pytest.raises(ValueError, match="must look like 512 or 512x768"):
        parse_size("0512", square=True)


def test_seeds_are_below_two_to_the_32() -> None:
    assert SEED_SPACE == 2**32 and MAX_SEED == 2**32 - 1
    assert all(0 <= random_seed() <= MAX_SEED for _ in range(100))


def test_a_request_of_n_images_counts_its_seeds_on_and_wraps() -> None:
    request = GenerationRequest("a cat", MAX_SEED - 1, 96, 64, Decoder.TINY)
    images = request.images(3)
    assert [image.seed for image in images] == [MAX_SEED - 1, MAX_SEED, 0]
    assert {(image.prompt, image.batch_key) for image in images} == {
        ("a cat", BatchKey(96, 64, Decoder.TINY))
    }
