"""The fixed held-out prompt set of the shapes domain (``heldout_prompts.json``) and its disjointness check.

Procedure (deterministic): walk the items ``0, 1, 2, ...`` of ``SyntheticShapesDataset(seed=12345)`` (an
index space whose random streams, ``seed * 1_000_003 + index``, do not overlap those of the training seeds
0 to 3) and keep each caption that is new and not among the captions of the shipped transformer's training
stream (data seed 1, 5,000 items; the tokenizer never sees captions), one third per layout (single object,
two objects in a relation, 2-3 identical objects; the layout read by the checker's prompt parser), until
``NUM_PROMPTS`` prompts are kept; they are stored in round-robin layout order, so any first N are
balanced. Each entry keeps its dataset index so that the real scene can be rendered
for the checker's ceiling.

Training cannot see them: the transformer trainer's ``--exclude_prompts examples/eval/heldout_prompts.json``
redraws any training scene whose caption is a held-out prompt (``SyntheticShapesDataset(exclude_captions=)``),
and ``check_disjoint`` (run by ``evaluate.py`` on every load) re-checks that no held-out prompt occurs in the
stream of any config in ``examples/training/`` (its ``data_seed``, ``num_samples``, ``exclude_prompts`` and ``layout_weights``).
Count prompts ("two green triangles") have few wordings, so without the exclusion a larger training stream
would soon contain them all.

    python examples/eval/heldout.py              # (re)write heldout_prompts.json
    python examples/eval/heldout.py --reworded   # (re)write reworded_prompts.json from it (see build_reworded)
"""

import functools
import glob
import json
import os
from typing import Dict, FrozenSet, Iterable, List, Sequence, Set, Tuple

from adherence import parse_prompt
from hart_pipeline.training.data import LAYOUT_WEIGHTS, LAYOUTS, PLURAL, SyntheticShapesDataset

HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT_PATH = os.path.join(HERE, "heldout_prompts.json")
REPO_ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
TRAINING_CONFIGS = os.path.join(REPO_ROOT, "examples", "training", "*.json")
HELDOUT_SEED = 12345
SHIPPED_STREAMS = ((1, 5000),)  # (data_seed, num_samples) of the shipped transformer's training data
NUM_PROMPTS = 256


def captions(seed: int, num_samples: int, exclude: Iterable[str] = (),
             layout_weights: Sequence[float] = LAYOUT_WEIGHTS) -> Set[str]:
    """The captions of the first ``num_samples`` items of the dataset with ``seed`` (no rendering)."""
    return set(_captions(seed, num_samples, frozenset(exclude), tuple(layout_weights)))


@functools.lru_cache(maxsize=8)
def _captions(seed: int, num_samples: int, exclude: FrozenSet[str], layout_weights: Tuple[float, ...]) -> FrozenSet[str]:
    # cached: every evaluation re-checks the streams of examples/training/ (50,000 captions take seconds)
    data = SyntheticShapesDataset(num_samples, 64, seed, exclude_captions=exclude, layout_weights=layout_weights)
    return frozenset(data.caption(i) for i in range(num_samples))


def layout(prompt: str) -> str:
    """'single', 'relation' or 'count', as the checker reads the prompt."""
    expect = parse_prompt(prompt)
    return "single" if expect.count == 1 else "relation" if len(expect.objects) == 2 else "count"


def build(num_prompts: int = NUM_PROMPTS, seed: int = HELDOUT_SEED,
          excluded: Iterable[Tuple[int, int]] = SHIPPED_STREAMS) -> Dict:
    """The held-out set as a JSON-ready dict (see the module docstring for the procedure)."""
    excluded = list(excluded)
    seen = set().union(*(captions(s, n) for s, n in excluded))
    data = SyntheticShapesDataset(10 ** 7, 64, seed)
    quota = {name: num_prompts // 3 + (i < num_prompts % 3) for i, name in enumerate(LAYOUTS)}
    prompts, kept = [], set()
    index = 0
    while len(prompts) < num_prompts:
        caption = data.caption(index)
        kind = layout(caption)
        if caption not in seen and caption not in kept and quota[kind] > 0:
            kept.add(caption)
            quota[kind] -= 1
            prompts.append({"index": index, "layout": kind, "prompt": caption})
        index += 1
    by_layout = [[p for p in prompts if p["layout"] == name] for name in LAYOUTS]
    prompts = [p for group in zip(*by_layout) for p in group] + by_layout[0][len(by_layout[2]):]  # round robin:
    # any first N prompts are balanced across layouts
    return {"data_seed": seed, "excluded_streams": [{"data_seed": s, "num_samples": n} for s, n in excluded],
            "procedure": "examples/eval/heldout.py", "prompts": prompts}


# ------------------------------------------------------------------------------------------- reworded set
# Wordings the training captions never use (issue 26): other templates, "one" / "small" / "that is", other position
# and relation phrases. Each reworded prompt keeps its held-out scene; it is scored as the caption it rewords.
REWORDED_PATH = os.path.join(HERE, "reworded_prompts.json")
NEW_PLACES = {"left": ("toward the left edge", "far to the left"), "right": ("toward the right edge", "far to the right"),
              "top": ("up high", "close to the upper edge"), "bottom": ("down low", "close to the lower edge"),
              "center": ("in the very middle", "at the very centre")}
NEW_RELATIONS = {"above": ("higher than", "directly above", "sitting on top of"),
                 "below": ("lower than", "directly below", "underneath"),
                 "left of": ("on the left side of", "further left than"),
                 "right of": ("on the right side of", "further right than")}
NEW_NUMBERS = {2: ("exactly two", "a couple of"), 3: ("exactly three", "a trio of")}


def reword(prompt: str, rng) -> str:
    """``prompt`` (a caption of the training templates) in a wording of the templates above."""
    expect = parse_prompt(prompt)
    if expect.count > 1 and len(expect.objects) == 1:
        (colour, shape), = expect.objects
        forms = (f"{rng.choice(NEW_NUMBERS[expect.count])} small {colour} {PLURAL[shape]}",
                 f"{rng.choice(NEW_NUMBERS[expect.count])} {PLURAL[shape]}, all of them {colour}")
        return rng.choice(forms)
    if len(expect.objects) == 2:
        (c1, s1), (c2, s2) = expect.objects
        rel = rng.choice(NEW_RELATIONS[expect.relation])
        forms = (f"a {s1} that is {c1}, {rel} a {s2} that is {c2}", f"one {c1} {s1} {rel} one {c2} {s2}",
                 f"a small {c1} {s1} {rel} a small {c2} {s2}")
        return rng.choice(forms)
    (colour, shape), = expect.objects
    where = rng.choice(NEW_PLACES[expect.place])
    forms = (f"one small {colour} {shape} {where}", f"a {shape} that is {colour}, {where}",
             f"there is one {colour} {shape} {where}")
    return rng.choice(forms)


def build_reworded(heldout: Dict, seed: int = 0) -> Dict:
    """The held-out set reworded: the same scenes, each prompt in a new wording (``checked_as``: the original)."""
    import random

    rng = random.Random(seed)
    prompts = [{**entry, "prompt": reword(entry["prompt"], rng), "checked_as": entry["prompt"]}
               for entry in heldout["prompts"]]
    return {**heldout, "procedure": "examples/eval/heldout.py --reworded (heldout.build_reworded)", "prompts": prompts}


Stream = Tuple[int, int, List[str], Sequence[float]]  # data_seed, num_samples, excluded captions, layout weights


def training_streams(pattern: str = TRAINING_CONFIGS) -> List[Stream]:
    """The caption stream of every training config that defines one."""
    streams = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            config = json.load(f)
        if "data_seed" in config and "tokenizer_path" in config:  # the tokenizer trainer reads no captions
            exclude = []
            if config.get("exclude_prompts"):
                with open(os.path.join(REPO_ROOT, config["exclude_prompts"])) as f:  # relative to the repository
                    exclude = [p["prompt"] for p in json.load(f)["prompts"]]
            streams.append((int(config["data_seed"]), int(config.get("num_samples", 5000)), exclude,
                            config.get("layout_weights", LAYOUT_WEIGHTS)))
    return streams


def check_disjoint(prompts: Iterable[str], streams: Iterable[Stream]) -> None:
    """``ValueError`` if a held-out prompt occurs among the captions of a training stream."""
    prompts = set(prompts)
    for seed, num_samples, exclude, layout_weights in streams:
        seen = prompts & captions(seed, num_samples, exclude, layout_weights)
        if seen:
            raise ValueError(f"{len(seen)} held-out prompts occur in the training stream data_seed={seed}, "
                             f"num_samples={num_samples} (e.g. {sorted(seen)[0]!r}): train with "
                             "--exclude_prompts examples/eval/heldout_prompts.json")


def load_heldout(path: str = HELDOUT_PATH, check: bool = True) -> Dict:
    """The held-out set; with ``check``, verified disjoint from the streams of ``examples/training/*.json``."""
    with open(path) as f:
        heldout = json.load(f)
    if check:  # the scenes' captions (a reworded set is scored as them) and the prompts the model reads
        check_disjoint({p[k] for p in heldout["prompts"] for k in ("prompt", "checked_as") if k in p}, training_streams())
    return heldout


if __name__ == "__main__":
    import sys

    reworded = "--reworded" in sys.argv[1:]
    result = build_reworded(load_heldout(check=False)) if reworded else build()
    path = REWORDED_PATH if reworded else HELDOUT_PATH
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {len(result['prompts'])} prompts to {path}")
