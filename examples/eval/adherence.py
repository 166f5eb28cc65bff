"""An independent prompt-adherence checker for the coloured-shapes domain.

Independent of the training data generator: the expectations come from parsing the prompt *text*
(never from the dataset's scene attributes), and the image is read by its own code path:

1. background = median colour of the border pixels;
2. objects = connected components of pixels far from the background (small specks dropped);
3. each object: colour = nearest palette colour (CIELAB distance) of its median pixel, shape = triangle if
   its top quarter is much narrower than its bottom quarter, else square / circle from the fill ratio of its
   bounding box, centroid (x right, y down, in [0, 1]).

``score_image`` returns per-criterion results (1.0 / 0.0, or None where a criterion does not apply):
``colour`` (single-object prompts), ``both_colours`` (two-object prompts), ``relation`` (above / below /
left of / right of), ``count`` (1-3 objects, every prompt), ``shape`` (every named object), ``position``
(single-object prompts naming a place). The only domain knowledge shared with the generator is the palette
(colour names -> RGB), since the checker has to know what "red" looks like in this domain. Needs scipy
(in the ``test`` extra).
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from hart_pipeline.training.data import COLOURS

CRITERIA = ("colour", "both_colours", "relation", "count", "shape", "position")

SHAPE_NAMES = {  # words a prompt may use for each shape (singular and plural)
    "circle": ("circle", "circles", "disk", "disks", "round dot", "round dots", "dot", "dots", "ball", "balls"),
    "square": ("square", "squares", "box", "boxes", "block", "blocks", "rectangle", "rectangles"),
    "triangle": ("triangle", "triangles", "pyramid shape", "pyramid shapes", "pyramid", "pyramids"),
}
RELATION_NAMES = {  # longest phrases first so that "to the left of" wins over "left of"
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("on top of", "above", "over"),
    "below": ("beneath", "below", "under"),
}
COUNT_NAMES = {"three": 3, "3": 3, "two": 2, "2": 2, "a pair of": 2, "pair of": 2}
PLACE_NAMES = {"left": ("left",), "right": ("right",), "top": ("top", "upper"), "bottom": ("bottom", "lower"),
               "center": ("center", "centre", "middle")}
PLACE_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                 "center": (0.5, 0.5)}


@dataclass
class Expectation:
    """What a prompt asks for: objects as (colour, shape), a count, and optionally a relation or a place."""

    objects: List[Tuple[str, str]]  # (colour, shape) of each distinct named object
    count: int
    relation: Optional[str] = None  # relation of objects[0] to objects[1]
    place: Optional[str] = None

    @property
    def two_colours(self) -> bool:
        """Two named objects of different colours (what colour binding is measured on)."""
        return len(self.objects) == 2 and self.objects[0][0] != self.objects[1][0]


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOUR = _alternation(COLOURS)
_SHAPE = _alternation([w for ws in SHAPE_NAMES.values() for w in ws])
_OBJECT = re.compile(rf"\b({_COLOUR})\s+({_SHAPE})\b")
_COUNT = re.compile(rf"\b({_alternation(COUNT_NAMES)})\s+({_COLOUR})\s+({_SHAPE})\b")


def _shape_of(word: str) -> str:
    return next(shape for shape, words in SHAPE_NAMES.items() if word in words)


def parse_prompt(prompt: str) -> Expectation:
    """Read the expectations of a prompt of the shapes domain; ``ValueError`` if it names no coloured shape."""
    text = " " + prompt.lower().replace(",", " ") + " "
    text = re.sub(r"\s+", " ", text)
    match = _COUNT.search(text)
    if match:
        return Expectation([(match.group(2), _shape_of(match.group(3)))], COUNT_NAMES[match.group(1)])
    found = list(_OBJECT.finditer(text))
    if not found:
        raise ValueError(f"prompt {prompt!r} names no '<colour> <shape>' of the domain "
                         f"(colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPE_NAMES)})")
    objects = [(m.group(1), _shape_of(m.group(2))) for m in found[:2]]
    if len(found) >= 2:
        between = text[found[0].end():found[1].start()]
        relation = next((rel for rel, phrases in RELATION_NAMES.items()
                         if re.search(rf"\b({_alternation(phrases)})\b", between)), None)
        return Expectation(objects, 2, relation=relation)
    rest = text[:found[0].start()] + " " + text[found[0].end():]
    place = next((p for p, words in PLACE_NAMES.items() if re.search(rf"\b({_alternation(words)})\b", rest)), None)
    return Expectation(objects, 1, place=place)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 255] -> CIELAB (D65)."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


PALETTE_NAMES = list(COLOURS)
PALETTE_LAB = _srgb_to_lab(np.array(list(COLOURS.values())))


@dataclass
class DetectedObject:
    colour: str
    shape: str
    centre: Tuple[float, float]  # (x, y) in [0, 1], x right, y down
    pixels: int


def _classify_shape(mask: np.ndarray) -> str:
    """Triangle (apex up) if its top quarter is much narrower than its bottom quarter; else square / circle by
    how much of the bounding box it fills (square 1, circle pi/4)."""
    widths = mask.sum(axis=1).astype(np.float64)  # (h,) row widths
    quarter = max(1, len(widths) // 4)
    if widths[:quarter].mean() < 0.6 * widths[-quarter:].mean():
        return "triangle"
    return "square" if mask.mean() > 0.87 else "circle"


def find_objects(image: np.ndarray, min_fraction: float = 0.004) -> List[DetectedObject]:
    """Objects of an (H, W, 3) uint8 image, largest first (components of at least ``min_fraction`` of the image)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    h, w, _ = image.shape
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    labels, n = ndimage.label(distance > 60.0)  # 4-connected: antialiased corners do not merge neighbours
    objects = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == index
        area = int(mask.sum())
        if area < max(4, min_fraction * h * w):
            continue
        core = pixels[box][mask]
        lab = _srgb_to_lab(np.median(core, axis=0))
        colour = PALETTE_NAMES[int(np.linalg.norm(PALETTE_LAB - lab, axis=-1).argmin())]
        shape = _classify_shape(mask)
        ys, xs = np.nonzero(mask)
        centre = ((xs.mean() + box[1].start + 0.5) / w, (ys.mean() + box[0].start + 0.5) / h)
        objects.append(DetectedObject(colour, shape, centre, area))
    return sorted(objects, key=lambda o: -o.pixels)


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    return {"above": dy < 0 and abs(dy) > abs(dx), "below": dy > 0 and abs(dy) > abs(dx),
            "left of": dx < 0 and abs(dx) > abs(dy), "right of": dx > 0 and abs(dx) > abs(dy)}[relation]


def score_image(image: np.ndarray, prompt: str) -> Dict[str, Optional[float]]:
    """Per-criterion adherence (1.0 / 0.0; None where the criterion does not apply) of one image to its prompt."""
    expect = parse_prompt(prompt)
    found = find_objects(image)
    scores: Dict[str, Optional[float]] = dict.fromkeys(CRITERIA)
    scores["count"] = float(len(found) == expect.count)
    if expect.count == 1 or (expect.count > 1 and len(expect.objects) == 1):  # single object, or n identical ones
        colour, shape = expect.objects[0]
        subjects = found[:expect.count]
        if expect.count == 1:
            scores["colour"] = float(bool(found) and found[0].colour == colour)
            if expect.place is not None:
                scores["position"] = float(bool(found) and np.hypot(
                    *np.subtract(found[0].centre, PLACE_CENTRES[expect.place])) < 0.2)
        scores["shape"] = float(len(subjects) == expect.count and all(o.shape == shape for o in subjects))
        return scores
    (c1, s1), (c2, s2) = expect.objects
    first = next((o for o in found if o.colour == c1), None)
    second = next((o for o in found if o.colour == c2 and o is not first), None)
    scores["both_colours"] = float(sorted(o.colour for o in found[:2]) == sorted((c1, c2)))
    scores["shape"] = float(first is not None and second is not None and first.shape == s1 and second.shape == s2)
    if expect.relation is not None:
        scores["relation"] = float(first is not None and second is not None
                                   and _relation_holds(first, second, expect.relation))
    return scores


def swap_colours(prompt: str, expect: Optional[Expectation] = None) -> str:
    """The prompt with the colour words of its two named objects exchanged ("a red circle above a blue square"
    -> "a blue circle above a red square"); ``ValueError`` unless it names two objects of different colours.
    ``expect``: what the prompt asks for, when it is worded so that ``parse_prompt`` cannot read it."""
    expect = expect or parse_prompt(prompt)
    if not expect.two_colours:
        raise ValueError(f"prompt {prompt!r} does not name two objects of different colours")
    (c1, _), (c2, _) = expect.objects
    return re.sub(rf"\b({c1}|{c2})\b", lambda m: c2 if m.group(1).lower() == c1 else c1, prompt, flags=re.IGNORECASE)


RELATION_OUTCOMES = ("right", "swapped", "wrong direction", "one colour twice", "a wrong colour", "fewer than two objects")


def relation_outcome(image: np.ndarray, prompt: str) -> Optional[str]:
    """What an image of a two-colour relation prompt shows (None for other prompts), one of ``RELATION_OUTCOMES``:
    the two largest objects have the prompt's two colours and stand in its relation ("right"), in the opposite
    order ("swapped": the colours are not bound to their places) or neither ("wrong direction"); or the two
    largest share one colour; or one of them has a colour the prompt does not name; or there are fewer than two."""
    expect = parse_prompt(prompt)
    if expect.relation is None or not expect.two_colours:
        return None
    (c1, _), (c2, _) = expect.objects
    found = find_objects(image)[:2]
    if len(found) < 2:
        return "fewer than two objects"
    if found[0].colour == found[1].colour:
        return "one colour twice"
    if {o.colour for o in found} != {c1, c2}:
        return "a wrong colour"
    first, second = found if found[0].colour == c1 else found[::-1]
    if _relation_holds(first, second, expect.relation):
        return "right"
    return "swapped" if _relation_holds(second, first, expect.relation) else "wrong direction"


def mean_scores(rows: List[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    """Mean of each criterion over the rows where it applies (None if it never applies)."""
    out = {}
    for name in CRITERIA:
        values = [r[name] for r in rows if r[name] is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


__all__ = ["CRITERIA", "RELATION_OUTCOMES", "DetectedObject", "Expectation", "find_objects", "mean_scores", "parse_prompt",
           "relation_outcome", "score_image", "swap_colours"]
