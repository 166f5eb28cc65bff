"""An offline, deterministic synthetic captioned dataset of coloured shapes (for training toy HART models).

Every item is rendered with PIL from its index and the dataset seed alone, so the dataset needs no
files and no network. Three layouts:

* single:   one shape at a named position ("a red circle on the left");
* relation: two different shapes in a spatial relation ("a red circle above a blue square");
* count:    two or three identical shapes ("two green triangles").

``layout_weights`` sets their relative frequencies (default 0.35 / 0.4 / 0.25).

Captions are drawn from several templates and synonyms so that the text conditioning is really
exercised. ``attributes`` lists ``(shape, colour, cx, cy)`` with centres in [0, 1] (x to the right,
y downwards) for programmatic evaluation of generated images.
"""

import random
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
}
BACKGROUNDS = ((0, 0, 0), (25, 25, 25), (15, 20, 45), (40, 40, 40))
POSITIONS: Dict[str, Tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
SHAPE_WORDS = {
    "circle": ("circle", "circle", "disk", "round dot"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangle", "pyramid shape"),
}
PLURAL = {"circle": "circles", "disk": "disks", "round dot": "round dots", "square": "squares", "box": "boxes",
          "block": "blocks", "triangle": "triangles", "pyramid shape": "pyramid shapes"}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the centre"),
}
RELATIONS = {  # relation -> (words, offset of the first shape relative to the second, in units of the gap)
    "above": (("above", "over", "on top of"), (0.0, -1.0)),
    "below": (("below", "under", "beneath"), (0.0, 1.0)),
    "left of": (("to the left of", "left of"), (-1.0, 0.0)),
    "right of": (("to the right of", "right of"), (1.0, 0.0)),
}
NUMBERS = {2: ("two", "2", "a pair of"), 3: ("three", "3", "three")}
PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ", "a simple render of ")
SUFFIXES = ("", "", "", " on a dark background", ", plain background", ", simple shapes")
LAYOUTS = ("single", "relation", "count")
LAYOUT_WEIGHTS = (0.35, 0.4, 0.25)  # the default stream (every shipped model so far trained on it at first)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class ShapeItem:
    image: torch.Tensor  # (3, S, S) in [-1, 1]
    caption: str
    attributes: List[Tuple[str, str, float, float]]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=colour)


def render(objects: List[Tuple[str, str, float, float]], size: int, radius: float, background, supersample: int = 4) -> Image.Image:
    """Draw ``(shape, colour, cx, cy)`` objects (centres in [0, 1]) with antialiasing by supersampling."""
    big = size * supersample
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    for shape, colour, cx, cy in objects:
        _draw_shape(draw, shape, COLOURS[colour], cx * big, cy * big, radius * big)
    return img.resize((size, size), Image.LANCZOS)


def check_layout_weights(weights: Sequence[float]) -> Tuple[float, float, float]:
    """``weights`` of the (single, relation, count) layouts as a tuple, or a ``ValueError`` naming the fix."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(LAYOUTS) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"layout_weights must be {len(LAYOUTS)} non-negative numbers (for {', '.join(LAYOUTS)}) "
                         f"with a positive sum, e.g. {list(LAYOUT_WEIGHTS)}; got {list(weights)}")
    return weights


def sample_scene(rng: random.Random, layout_weights: Sequence[float] = LAYOUT_WEIGHTS
                 ) -> Tuple[str, List[Tuple[str, str, float, float]], float]:
    """A random caption, its objects (shape, colour, cx, cy) and the shape radius (fraction of the side).

    ``layout_weights``: relative frequencies of the single-object, two-object relation and count layouts.
    """
    layout = rng.choices(LAYOUTS, weights=layout_weights)[0]
    jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731
    if layout == "single":
        shape, colour, pos = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(POSITIONS))
        cx, cy = POSITIONS[pos]
        objects = [(shape, colour, cx + jitter(), cy + jitter())]
        word = rng.choice(SHAPE_WORDS[shape])
        where = rng.choice(POSITION_WORDS[pos])
        body = rng.choice((f"{_article(colour)} {colour} {word} {where}", f"{where}, {_article(colour)} {colour} {word}",
                           f"{_article(colour)} {colour} {word} placed {where}"))
        radius = 0.17
    elif layout == "relation":
        s1, s2 = rng.sample(SHAPES, 2) if rng.random() < 0.7 else (rng.choice(SHAPES),) * 2
        c1, c2 = rng.sample(list(COLOURS), 2)
        rel = rng.choice(list(RELATIONS))
        words, (dx, dy) = RELATIONS[rel]
        gap = 0.25
        mx, my = 0.5 + jitter(), 0.5 + jitter()
        objects = [(s1, c1, mx + dx * gap, my + dy * gap), (s2, c2, mx - dx * gap, my - dy * gap)]
        w1, w2 = rng.choice(SHAPE_WORDS[s1]), rng.choice(SHAPE_WORDS[s2])
        body = f"{_article(c1)} {c1} {w1} {rng.choice(words)} {_article(c2)} {c2} {w2}"
        radius = 0.15
    else:
        shape, colour, n = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice((2, 3))
        horizontal = rng.random() < 0.6
        coords = np.linspace(0.2, 0.8, n) if n == 3 else np.array([0.28, 0.72])
        other = 0.5 + jitter()
        objects = [(shape, colour, float(c), other) if horizontal else (shape, colour, other, float(c)) for c in coords]
        word = PLURAL[rng.choice(SHAPE_WORDS[shape])]
        body = f"{rng.choice(NUMBERS[n])} {colour} {word}"
        if rng.random() < 0.4:
            body += " in a row" if horizontal else " in a column"
        radius = 0.13 if n == 3 else 0.15
    caption = (rng.choice(PREFIXES) + body + rng.choice(SUFFIXES)).strip()
    return caption, objects, radius


def colour_swapped(caption: str, objects: List[Tuple[str, str, float, float]]
                   ) -> Optional[Tuple[str, List[Tuple[str, str, float, float]]]]:
    """A two-object scene with its two colours exchanged, in the picture and in the caption (articles follow:
    "an orange circle above a red square" -> "a red circle above an orange square"); None for other scenes."""
    if len(objects) != 2 or objects[0][1] == objects[1][1]:
        return None
    (s1, c1, x1, y1), (s2, c2, x2, y2) = objects
    other = {c1: c2, c2: c1}
    twin = re.sub(rf"\b(?:an?) ({re.escape(c1)}|{re.escape(c2)})\b",
                  lambda m: f"{_article(other[m.group(1)])} {other[m.group(1)]}", caption)
    return twin, [(s1, c2, x1, y1), (s2, c1, x2, y2)]


class SyntheticShapesDataset(Dataset):
    """``num_samples`` deterministic items; item ``i`` depends only on ``(seed, i)``.

    Each item is a dict with ``image`` (3, S, S) float32 in [-1, 1], ``caption`` (str) and
    ``attributes`` (list of ``(shape, colour, cx, cy)``, centres in [0, 1]).

    ``colour_twins``: item ``2k + 1`` is item ``2k`` with its two colours exchanged (:func:`colour_swapped`: same
    shapes, places and background, the caption changed accordingly) when item ``2k`` is a two-colour scene, so a
    model can tell the pair apart only by binding each colour to its place; otherwise it is drawn as usual.
    """

    def __init__(self, num_samples: int = 10000, image_size: int = 64, seed: int = 0,
                 exclude_captions: Iterable[str] = (), layout_weights: Sequence[float] = LAYOUT_WEIGHTS,
                 colour_twins: bool = False):
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.layout_weights = check_layout_weights(layout_weights)
        # held-out prompts: a scene whose caption is one of them is redrawn from the item's own random stream
        self.exclude_captions = frozenset(exclude_captions)
        self.colour_twins = colour_twins

    def __len__(self) -> int:
        return self.num_samples

    def _scene(self, index: int) -> Tuple[random.Random, str, List[Tuple[str, str, float, float]], float]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self.colour_twins and index % 2:
            rng, caption, objects, radius = self._scene(index - 1)  # same generator state: same background
            twin = colour_swapped(caption, objects)
            if twin is not None and twin[0] not in self.exclude_captions:
                return rng, twin[0], twin[1], radius
        rng = random.Random(self.seed * 1_000_003 + index)
        caption, objects, radius = sample_scene(rng, self.layout_weights)
        while caption in self.exclude_captions:
            caption, objects, radius = sample_scene(rng, self.layout_weights)
        return rng, caption, objects, radius

    def caption(self, index: int) -> str:
        """The caption of item ``index`` without rendering its image (to compare caption sets quickly)."""
        return self._scene(index)[1]

    def item(self, index: int) -> ShapeItem:
        rng, caption, objects, radius = self._scene(index)
        background = rng.choice(BACKGROUNDS)
        img = render(objects, self.image_size, radius, background)
        array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return ShapeItem(image=array / 127.5 - 1.0, caption=caption, attributes=[tuple(o) for o in objects])

    def __getitem__(self, index: int) -> dict:
        it = self.item(index)
        return {"image": it.image, "caption": it.caption, "attributes": it.attributes}


def collate(batch: List[dict]) -> dict:
    """Stack images; keep captions and attributes as lists."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "attributes": [b["attributes"] for b in batch],
    }


__all__ = ["COLOURS", "LAYOUTS", "LAYOUT_WEIGHTS", "SHAPES", "ShapeItem", "SyntheticShapesDataset", "check_layout_weights",
           "collate", "colour_swapped", "render", "sample_scene"]
