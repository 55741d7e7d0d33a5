"""The synthetic domain: captions and 64x64 RGB scenes of one shape on a plain background.

Every attribute changes the picture and the caption names them, so a prompt really constrains the
image; jitter (position, size, colour, rotation) gives each caption many ground-truth images.
Everything is a pure function of a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (145, 55, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
_POSITION_PHRASE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_POSITION_XY = {"center": (32, 32), "left": (19, 32), "right": (45, 32), "top": (32, 19), "bottom": (32, 45)}
_RADIUS = {"small": 10.5, "large": 16.5}
ATTRIBUTES = ("shape", "color", "background", "size", "position")
CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "background": COLOR_NAMES,
    "size": SIZES,
    "position": POSITIONS,
}
# Every word a caption can use (the tokenizer gives each a whole-word token).
WORDS = tuple(
    sorted(
        set(SHAPES)
        | set(COLOR_NAMES)
        | set(SIZES)
        | {w for p in _POSITION_PHRASE.values() for w in p.split()}
        | {"a", "on", "background"}
    )
)


@dataclass(frozen=True)
class Scene:
    """The attributes of one picture (what a full caption says)."""

    shape: str
    color: str
    background: str
    size: str
    position: str

    def labels(self) -> dict[str, int]:
        return {a: CLASSES[a].index(getattr(self, a)) for a in ATTRIBUTES}

    def caption(
        self, keep_size: bool = True, keep_position: bool = True, keep_background: bool = True
    ) -> str:
        words = ["a"]
        if keep_size:
            words.append(self.size)
        words += [self.color, self.shape]
        if keep_position:
            words.append(_POSITION_PHRASE[self.position])
        if keep_background:
            words.append(f"on a {self.background} background")
        return " ".join(words)


def specified(caption: str) -> dict[str, str]:
    """The attributes a caption pins down (the rest are free), read back from its words."""
    words = caption.lower().split()
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in SHAPES:
            out["shape"] = w
            if i > 0 and words[i - 1] in COLORS:
                out["color"] = words[i - 1]
        elif w in SIZES:
            out["size"] = w
        elif w == "background" and i > 0 and words[i - 1] in COLORS:
            out["background"] = words[i - 1]
    for pos, phrase in _POSITION_PHRASE.items():
        if phrase in " ".join(words):
            out["position"] = pos
    return out


def sample_scene(rng: np.random.Generator) -> Scene:
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    backgrounds = [c for c in COLOR_NAMES if c != color]
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=color,
        background=backgrounds[rng.integers(len(backgrounds))],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
    )


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Captions drop optional phrases at random, so short prompts work and leave those attributes free."""
    return scene.caption(
        keep_size=bool(rng.random() > 0.3),
        keep_position=bool(rng.random() > 0.3),
        keep_background=bool(rng.random() > 0.15),
    )


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 14) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]]
    if shape == "square":
        pts = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
        scale = r * 0.85
    elif shape == "triangle":
        pts = [(0, -1.15), (1.1, 0.85), (-1.1, 0.85)]
        scale = r
    else:  # cross: a plus sign
        a, b = 0.36, 1.0
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        scale = r
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in pts]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One ground-truth image of the scene, (64, 64, 3) uint8, jittered by rng."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), _jitter_color(COLORS[scene.background], rng))
    draw = ImageDraw.Draw(img)
    px, py = _POSITION_XY[scene.position]
    cx = px + rng.uniform(-3, 3)
    cy = py + rng.uniform(-3, 3)
    r = _RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    fill = _jitter_color(COLORS[scene.color], rng)
    if scene.shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
    else:
        angle = math.radians(rng.uniform(-12, 12))
        draw.polygon([(x * s, y * s) for x, y in _polygon(scene.shape, cx, cy, r, angle)], fill=fill)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def make_dataset(n: int, seed: int) -> tuple[list[Scene], np.ndarray]:
    """n scenes and one jittered image each: (scenes, uint8 [n, 64, 64, 3])."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(sc, rng) for sc in scenes])
    return scenes, images


def label_array(scenes: list[Scene]) -> np.ndarray:
    """Integer labels [n, len(ATTRIBUTES)] in ATTRIBUTES order."""
    return np.array([[sc.labels()[a] for a in ATTRIBUTES] for sc in scenes], dtype=np.int64)


def scene_from_labels(row: np.ndarray) -> Scene:
    return Scene(**{a: CLASSES[a][int(v)] for a, v in zip(ATTRIBUTES, row, strict=True)})
