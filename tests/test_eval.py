"""The evaluation kit of examples/eval: the independent adherence checker, its prompt parser, the held-out
prompt set (disjoint from training) and the contact sheet / report writer."""

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hart_pipeline.training.data import SyntheticShapesDataset, render

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "eval"))
import adherence  # noqa: E402
import compare_tokenizers  # noqa: E402
import evaluate  # noqa: E402
import heldout  # noqa: E402


def _uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def test_checker_ceiling_on_rendered_scenes_is_high():
    data = SyntheticShapesDataset(120, 64, seed=777)
    rows = [adherence.score_image(_uint8(it.image), it.caption) for it in map(data.item, range(len(data)))]
    means = adherence.mean_scores(rows)
    assert all(means[c] is not None and means[c] >= 0.97 for c in adherence.CRITERIA), means


@pytest.mark.parametrize("prompt, criterion, expected", [
    ("a red circle above a blue square", "relation", 1.0),
    ("a red circle below a blue square", "relation", 0.0),
    ("a red circle left of a blue square", "relation", 0.0),
    ("a red circle above a blue square", "both_colours", 1.0),
    ("a green circle above a blue square", "both_colours", 0.0),
    ("a red triangle over a blue box", "shape", 0.0),
    ("a red disk on top of a blue block", "shape", 1.0),
    ("three red circles", "count", 0.0),
])
def test_checker_scores_follow_the_image_not_the_prompt(prompt, criterion, expected):
    image = np.asarray(render([("circle", "red", 0.5, 0.25), ("square", "blue", 0.5, 0.75)], 64, 0.15, (15, 20, 45)))
    assert adherence.score_image(image, prompt)[criterion] == expected


@pytest.mark.parametrize("objects, expected", [
    ([("circle", "red", 0.5, 0.25), ("square", "blue", 0.5, 0.75)], "right"),
    ([("circle", "blue", 0.5, 0.25), ("square", "red", 0.5, 0.75)], "swapped"),
    ([("circle", "red", 0.25, 0.5), ("square", "blue", 0.75, 0.5)], "wrong direction"),
    ([("circle", "red", 0.5, 0.25), ("square", "red", 0.5, 0.75)], "one colour twice"),
    ([("circle", "red", 0.5, 0.25), ("square", "green", 0.5, 0.75)], "a wrong colour"),
    ([("circle", "red", 0.5, 0.25)], "fewer than two objects"),
])
def test_relation_outcome_tells_swapped_colours_from_other_failures(objects, expected):
    image = np.asarray(render(objects, 64, 0.15, (15, 20, 45)))
    assert adherence.relation_outcome(image, "a red circle above a blue square") == expected
    assert adherence.relation_outcome(image, "two red circles") is None  # not a relation prompt


def test_swap_colours_exchanges_the_two_colour_words_only():
    swapped = adherence.swap_colours("a picture of a green disk to the left of a purple box, plain background")
    assert swapped == "a picture of a purple disk to the left of a green box, plain background"
    assert adherence.parse_prompt(swapped).relation == "left of"
    with pytest.raises(ValueError, match="two objects of different colours"):
        adherence.swap_colours("two red circles")


def test_checker_reads_colour_shape_position_and_count():
    image = np.asarray(render([("triangle", "yellow", 0.25, 0.5)], 64, 0.17, (0, 0, 0)))
    (found,) = adherence.find_objects(image)
    assert (found.colour, found.shape) == ("yellow", "triangle") and abs(found.centre[0] - 0.25) < 0.06
    scores = adherence.score_image(image, "a yellow pyramid shape on the left")
    assert scores["colour"] == scores["shape"] == scores["position"] == scores["count"] == 1.0
    assert adherence.score_image(image, "a cyan triangle at the top")["colour"] == 0.0
    assert adherence.score_image(image, "a yellow triangle at the top")["position"] == 0.0
    three = np.asarray(render([("square", "purple", x, 0.5) for x in (0.2, 0.5, 0.8)], 64, 0.13, (40, 40, 40)))
    assert adherence.score_image(three, "3 purple boxes in a row")["count"] == 1.0
    assert adherence.score_image(three, "two purple squares")["count"] == 0.0


def test_prompt_parser():
    e = adherence.parse_prompt("a picture of an orange box to the right of a blue triangle, simple shapes")
    assert (e.objects, e.count, e.relation) == ([("orange", "square"), ("blue", "triangle")], 2, "right of")
    e = adherence.parse_prompt("in the middle, a white round dot")
    assert (e.objects, e.count, e.place) == ([("white", "circle")], 1, "center")
    e = adherence.parse_prompt("a pair of cyan pyramid shapes in a column")
    assert (e.objects, e.count) == ([("cyan", "triangle")], 2)
    with pytest.raises(ValueError, match="names no"):
        adherence.parse_prompt("a dog on a sofa")
    data = SyntheticShapesDataset(300, 64, seed=3)  # every caption the generator writes is understood
    for i in range(len(data)):
        attributes = data.item(i).attributes
        e = adherence.parse_prompt(data.caption(i))
        assert e.count == len(attributes) and {c for c, _ in e.objects} == {a[1] for a in attributes}


def test_heldout_set_is_fixed_balanced_and_kept_out_of_training():
    with open(heldout.HELDOUT_PATH) as f:
        stored = json.load(f)
    prompts = [p["prompt"] for p in stored["prompts"]]
    assert len(prompts) == len(set(prompts)) == heldout.NUM_PROMPTS
    assert [p["layout"] for p in stored["prompts"][:6]] == ["single", "relation", "count"] * 2
    assert not set(prompts) & heldout.captions(1, 5000)  # the shipped transformer's training captions
    # a larger training stream with the exclusion never draws them; without it, it would
    assert not set(prompts) & heldout.captions(1, 20000, prompts)
    assert set(prompts) & heldout.captions(1, 20000)
    heldout.load_heldout()  # the configs in examples/training/ pass the check
    with pytest.raises(ValueError, match="exclude_prompts"):
        heldout.check_disjoint(prompts, [(1, 20000, [], heldout.LAYOUT_WEIGHTS)])
    data = SyntheticShapesDataset(10 ** 7, 64, stored["data_seed"])
    assert [data.caption(p["index"]) for p in stored["prompts"][:20]] == prompts[:20]


def test_reworded_set_keeps_the_scenes_in_wordings_training_never_uses():
    from hart_pipeline.training.data import NUMBERS, PLURAL, POSITION_WORDS, PREFIXES, RELATIONS, SHAPE_WORDS, SUFFIXES

    stored, original = heldout.load_heldout(heldout.REWORDED_PATH), heldout.load_heldout()
    assert [e["checked_as"] for e in stored["prompts"]] == [e["prompt"] for e in original["prompts"]]
    assert [e["index"] for e in stored["prompts"]] == [e["index"] for e in original["prompts"]]
    assert heldout.build_reworded(original) == stored  # rebuilt the same (deterministic)
    phrases = [*PREFIXES, *SUFFIXES, *[w for ws in SHAPE_WORDS.values() for w in ws], *PLURAL.values(),
               *[w for ws in POSITION_WORDS.values() for w in ws], *[w for ws, _ in RELATIONS.values() for w in ws],
               *[w for ws in NUMBERS.values() for w in ws], "placed", "in a row", "in a column", "a", "an"]
    vocabulary = {word for phrase in phrases for word in phrase.replace(",", " ").split()} | set(adherence.COLOURS)
    for entry in stored["prompts"]:  # every prompt uses a word no training caption has
        assert set(entry["prompt"].replace(",", " ").split()) - vocabulary, entry["prompt"]
        expect, reworded = adherence.parse_prompt(entry["checked_as"]), entry["prompt"]
        assert all(c in reworded and s in reworded for c, s in expect.objects)  # the same colours and shapes named
        if expect.two_colours:  # in the same order: the colour swap of the probe applies to it
            (c1, _), (c2, _) = expect.objects
            assert reworded.index(c1) < reworded.index(c2)
            assert adherence.swap_colours(reworded, expect).index(c2) < adherence.swap_colours(reworded, expect).index(c1)


def test_exclusion_redraws_only_the_excluded_items():
    plain = SyntheticShapesDataset(40, 32, seed=5)
    excluded = {plain.caption(3), plain.caption(10)}
    kept = SyntheticShapesDataset(40, 32, seed=5, exclude_captions=excluded)
    assert all(kept.caption(i) not in excluded for i in range(40))
    torch.testing.assert_close(kept.item(0).image, plain.item(0).image, rtol=0, atol=0)


def test_transformer_trainer_reads_the_exclusion(tmp_path):
    from hart_pipeline.training import train_transformer

    args = train_transformer.build_parser().parse_args(["--exclude_prompts", heldout.HELDOUT_PATH, "--num_samples", "50"])
    dataset = train_transformer.training_dataset(args)
    assert dataset.exclude_captions == frozenset(p["prompt"] for p in heldout.load_heldout(check=False)["prompts"])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="--exclude_prompts"):
        train_transformer.excluded_captions(train_transformer.build_parser().parse_args(["--exclude_prompts", str(bad)]))


def test_residual_guidance_option():
    assert [evaluate.residual_guidance_arg(v) for v in ("model", "official", "0", "0.5")] == ["model", "official", 0.0, 0.5]
    for bad in ("-1", "high", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="'model', 'official' or a number >= 0"):
            evaluate.residual_guidance_arg(bad)


def test_evaluate_writes_contact_sheet_and_report(tmp_path):
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = evaluate.evaluate(pipe, "tiny", str(tmp_path), num_prompts=3, seeds=[0, 1], guidance_scale=4.5,
                               num_images=4, sheet_prompts=2, teacher_forced_scales=[0, 2])
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.width > 3 * pipe.default_size and sheet.height > 2 * pipe.default_size
    report = (tmp_path / "report.md").read_text()
    assert "± " in report and "real scenes (ceiling of the checker)" in report
    assert "| relation | 1 |" in report and "| 2 | 1x1, 2x2 |" in report
    # per layout: the single prompt alone carries colour / position, the relation prompt both_colours
    by_layout = result["by_layout"]
    assert by_layout["single"]["colour"]["mean"] is not None and by_layout["single"]["both_colours"]["mean"] is None
    assert by_layout["relation"]["both_colours"]["mean"] is not None
    shares = result["relation_outcomes"]  # the relation prompt's outcomes: shares that sum to one per seed
    assert set(shares) == set(adherence.RELATION_OUTCOMES)
    assert sum(v["mean"] for v in shares.values()) == pytest.approx(1.0) and "| swapped |" in report
    probe = result["order_probe"]  # one two-colour relation scene: the true prompt explains it better or not
    assert probe["num_scenes"] == 1 and probe["order_accuracy"] in (0.0, 1.0) and probe["scale"] == "2x2"
    assert probe["ce_true"] > 0 and probe["ce_swapped"] > 0 and "Order probe (1 real scenes" in report
    # K = 0 forces nothing: the same draws as the unforced run (its discrete decoding)
    assert result["teacher_forced"][0] == result["adherence"]["discrete_only"]
    assert result["residual_guidance"] == "the final scale's (official)" and "residual-stage guidance the final" in report
    with pytest.raises(ValueError, match="--teacher-forced-scales"):
        evaluate.evaluate(pipe, "tiny", str(tmp_path), num_prompts=3, seeds=[0], guidance_scale=4.5, num_images=4,
                          teacher_forced_scales=[len(pipe.vae.config.patch_nums)])
    assert json.loads((tmp_path / "report.json").read_text())["seeds"] == [0, 1]
    # three prompts = one of each layout: each criterion has a value per seed
    assert result["adherence"]["with_residual"]["relation"]["mean"] is not None
    assert result["adherence"]["real_images"]["count"] == 1.0
    assert np.isfinite(result["reconstruction"]["psnr_hybrid"]["mean"])
    with pytest.raises(ValueError, match="--num-prompts"):
        evaluate.evaluate(pipe, "tiny", str(tmp_path), num_prompts=10 ** 4, seeds=[0], guidance_scale=4.5, num_images=4)
    # the reworded set: the model reads the new wording, the checker scores the original caption's meaning
    reworded = evaluate.evaluate(pipe, "tiny", str(tmp_path / "reworded"), num_prompts=3, seeds=[0],
                                 guidance_scale=4.5, num_images=4, heldout_path=heldout.REWORDED_PATH)
    assert reworded["heldout"] == heldout.REWORDED_PATH and reworded["order_probe"]["num_scenes"] == 1
    assert reworded["adherence"]["real_images"] == result["adherence"]["real_images"]  # the same scenes
    assert "reworded_prompts.json" in (tmp_path / "reworded" / "report.md").read_text()


def test_compare_tokenizers_groups_seeds_and_reports_baselines_discrete_only(tmp_path):
    from conftest import tiny_vae

    paths = []
    for seed in range(3):
        paths.append(str(tmp_path / f"vae_{seed}"))
        tiny_vae(seed=seed).save_pretrained(paths[-1])
    result = compare_tokenizers.compare({"hybrid": paths[:2], "var": paths[2:]}, num_images=4, baselines=["var"])
    one = evaluate.reconstruction(tiny_vae(seed=0), compare_tokenizers.heldout_images(4))
    two = evaluate.reconstruction(tiny_vae(seed=1), compare_tokenizers.heldout_images(4))
    assert result["hybrid"]["psnr_hybrid"]["mean"] == pytest.approx((one["psnr_hybrid"] + two["psnr_hybrid"]) / 2)
    assert result["hybrid"]["psnr_hybrid"]["std"] > 0 and result["var"]["psnr_discrete"]["std"] == 0.0
    table = compare_tokenizers.markdown(result, 4)
    assert table.count("| hybrid (2) |") == 2 and table.count("| var (1) |") == 1  # a baseline: discrete row only
    out = tmp_path / "table1.md"
    compare_tokenizers.main(["--group", "hybrid", *paths[:2], "--baseline", "var", paths[2], "--num-images", "4",
                             "--output", str(out)])
    assert out.read_text() == table and json.loads((tmp_path / "table1.json").read_text())["var"]["discrete_only"]
    with pytest.raises(SystemExit):
        compare_tokenizers.main(["--group", "hybrid"])  # a group without tokenizers
    with pytest.raises(SystemExit, match="same name"):
        compare_tokenizers.main(["--group", "a", paths[0], "--baseline", "a", paths[1]])
