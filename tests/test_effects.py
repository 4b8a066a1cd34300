"""The toy-edit metrics (`metrics.toy_edit`), their use by `evaluate`, and the effects benchmark (`benchmarks.effects`).

Effects asserted on the shipped toy weights are only those the measured table (docs/effects.md) shows to hold
robustly at small n; directions that did not reproduce are reported there, not asserted here.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dreamsteer.data.scenes import SUBJECT, SceneObject, render
from dreamsteer.metrics.toy_edit import (ToyTruthError, is_toy_edit, parse_toy_caption, toy_edit_metrics, truth_from_prompts,
                                         truth_from_scene)
from tests.conftest import REPO_ROOT

TOY_DIR = REPO_ROOT / "diffusion" / "builtin" / "toy"
needs_toy = pytest.mark.skipif(not (TOY_DIR / "model_index.json").is_file(),
                               reason=f"the built-in toy weights are not shipped in this checkout ({TOY_DIR} is absent)")

SQUARE = SceneObject("square", "red", (0.3, 0.3), 0.2)
CIRCLE = SceneObject("circle", "purple", (0.7, 0.7), 0.2)


def _metrics(targets, edited_objects, background="white"):
    scene = render("white", [SQUARE, CIRCLE])
    return toy_edit_metrics(scene.image, render(background, edited_objects).image, truth_from_scene(scene, targets))


def test_toy_edit_metrics_read_the_target_scene_at_the_objects_places():
    green = replace(SQUARE, color="green")
    done = _metrics([green, CIRCLE], [green, CIRCLE])
    assert done["success"] and done["targets_hit"] == 1.0 and done["others_kept"] and done["background_kept"]
    assert done["box_iou"] == pytest.approx(1.0) and done["edited"] == [0] and done["subject_score"] is None
    assert done["outside_change"] == pytest.approx(0.0, abs=1e-6)  # nothing changed outside the square

    unchanged = _metrics([green, CIRCLE], [SQUARE, CIRCLE])
    assert not unchanged["success"] and unchanged["targets_hit"] == 0.0 and unchanged["others_kept"]

    other_changed = _metrics([green, CIRCLE], [green, replace(CIRCLE, color="yellow")])
    assert not other_changed["success"] and other_changed["targets_hit"] == 1.0 and not other_changed["others_kept"]
    assert other_changed["outside_change"] > 10  # the circle's pixels changed by ~190 on ~10% of the image

    wrong_shape = _metrics([green, CIRCLE], [replace(green, shape="star"), CIRCLE])
    assert not wrong_shape["success"] and wrong_shape["targets_hit"] == 0.0

    gray = _metrics([green, CIRCLE], [green, CIRCLE], background="gray")
    assert not gray["success"] and not gray["background_kept"] and gray["targets_hit"] == 1.0

    moved = _metrics([green, CIRCLE], [replace(green, center=(0.3, 0.75)), CIRCLE])
    assert not moved["success"] and moved["targets_hit"] == 0.0 and moved["box_iou"] < 0.2  # recolored, but not at its place


def test_toy_edit_metrics_score_the_subject_at_its_place():
    subject = replace(CIRCLE, color=SUBJECT.color, inner_color=SUBJECT.inner_color)
    done = _metrics([SQUARE, subject], [SQUARE, subject])
    assert done["success"] and done["subject_score"] > 0.8
    plain_blue = _metrics([SQUARE, subject], [SQUARE, replace(CIRCLE, color=SUBJECT.color)])
    assert not plain_blue["success"] and plain_blue["subject_score"] < 0.1


def test_truth_from_prompts_pairs_the_captions_objects_with_the_detected_ones():
    scene = render("cyan", [SQUARE, CIRCLE])
    target = "a red square and a <sks> circle on a cyan background"
    truth = truth_from_prompts(scene.image, scene.caption, target)
    expected = truth_from_scene(scene, [SQUARE, replace(CIRCLE, color=SUBJECT.color, inner_color=SUBJECT.inner_color)])
    assert truth.before == expected.before and truth.after == expected.after and truth.edited == [1]
    assert [(m & e).sum() / (m | e).sum() for m, e in zip(truth.masks, expected.masks)] == [pytest.approx(1.0, abs=0.2)] * 2
    # captions in the other order pair by attributes, not by position in the image
    swapped = render("cyan", [CIRCLE, SQUARE])
    assert truth_from_prompts(swapped.image, scene.caption, target).boxes.tolist() == [list(b) for b in swapped.boxes[::-1]]
    with pytest.raises(ToyTruthError, match="as many objects"):
        truth_from_prompts(scene.image, scene.caption, "a red square on a cyan background")
    with pytest.raises(ToyTruthError, match="finds 2 objects"):
        truth_from_prompts(scene.image, "a red square on a cyan background", "a green square on a cyan background")
    assert parse_toy_caption("a sks circle on a gray background")[1][0].subject
    with pytest.raises(ToyTruthError, match="neither"):
        parse_toy_caption("a photo of a cat on a white background")


def test_is_toy_edit_needs_the_worlds_size_and_grammar():
    scene = render("white", [SQUARE])
    assert is_toy_edit(scene.image, scene.caption, "a green square on a white background")
    assert not is_toy_edit(scene.image.resize((64, 64)), scene.caption, "a green square on a white background")
    assert not is_toy_edit(scene.image, "a photo of a cat", "a photo of a dog")


def _fake_edit_run(folder, jobs):
    """An edit run folder of the editor's output contract with rendered 'edits'."""
    folder.mkdir(parents=True)
    for job_id, source, edited, source_prompt, target_prompt in jobs:
        source.save(folder / f"{job_id}_source.png")
        edited.save(folder / f"{job_id}.png")
        record = {"id": job_id, "image": str(folder / f"{job_id}_source.png"), "source_prompt": source_prompt, "target_prompt": target_prompt,
                  "method": "dds", "adapter": None, "seed": 0, "output": str(folder / f"{job_id}.png"), "mask": None,
                  "source_resized": str(folder / f"{job_id}_source.png"), "params": {}, "timings": {}}
        (folder / f"{job_id}.json").write_text(json.dumps(record))


def test_evaluate_reports_the_toy_detector_metrics_of_toy_runs(tmp_path):
    from dreamsteer.train.config import compose
    from dreamsteer.train.evaluate import run

    scene = render("white", [SQUARE, CIRCLE])
    green = render("white", [replace(SQUARE, color="green"), CIRCLE])
    target = "a green square and a purple circle on a white background"
    _fake_edit_run(tmp_path / "run", [("good", scene.image, green.image, scene.caption, target),
                                      ("noop", scene.image, scene.image, scene.caption, target)])
    results = run(compose("evaluate", ["run=" + str(tmp_path / "run"), f"output_dir={tmp_path / 'eval'}", "logger=none", "progress=false"]))
    toy = results["runs"][0]["toy"]
    assert toy["n"] == 2 and toy["success"] == 0.5 and toy["others_kept"] == 1.0
    assert results["runs"][0]["jobs"]["good"]["toy"]["success"] and not results["runs"][0]["jobs"]["noop"]["toy"]["success"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Toy-world detector" in report
    off = run(compose("evaluate", ["run=" + str(tmp_path / "run"), f"output_dir={tmp_path / 'eval_off'}", "logger=none", "progress=false",
                                   "toy_metrics=false"]))
    assert "toy" not in off["runs"][0] and "Toy-world detector" not in (tmp_path / "eval_off" / "report.html").read_text()


def test_evaluate_leaves_photo_runs_alone_and_names_unreadable_toy_jobs(tmp_path):
    from dreamsteer.train.config import compose
    from dreamsteer.train.evaluate import run

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    _fake_edit_run(tmp_path / "run", [("cat", photo, photo, "a photo of a cat", "a photo of a dog")])
    auto = run(compose("evaluate", ["run=" + str(tmp_path / "run"), f"output_dir={tmp_path / 'a'}", "logger=none", "progress=false"]))
    assert "toy" not in auto["runs"][0] and "toy" not in auto["runs"][0]["jobs"]["cat"]
    forced = run(compose("evaluate", ["run=" + str(tmp_path / "run"), f"output_dir={tmp_path / 'b'}", "logger=none", "progress=false",
                                      "toy_metrics=true"]))
    assert "does not end with" in forced["runs"][0]["jobs"]["cat"]["toy"]["unavailable"]
    assert "cat" in (tmp_path / "b" / "report.html").read_text()


def test_scene_groups_say_when_a_prompt_names_a_color_twice_or_cannot_tell_two_objects_apart():
    from dreamsteer.benchmarks.toy_edits import EditCase, rates_by_group, scene_group

    def case(objects, targets):
        return EditCase("c", "color", render("gray", objects), targets)

    red_square, red_circle = SQUARE, replace(CIRCLE, color="red")
    twin = replace(SQUARE, center=(0.7, 0.7))
    cases = [
        case([SQUARE], [replace(SQUARE, color="blue")]),  # one object
        case([SQUARE, CIRCLE], [replace(SQUARE, color="green"), CIRCLE]),  # red, purple -> green, purple
        case([SQUARE, CIRCLE], [replace(SQUARE, color="purple"), CIRCLE]),  # the target names purple twice
        case([red_square, red_circle], [replace(red_square, color="blue"), red_circle]),  # the source names red twice
        case([SQUARE, twin], [SQUARE, replace(twin, color="blue")]),  # two red squares: which one?
    ]
    assert [scene_group(c) for c in cases] == ["one object", "two objects, distinct colors", "two objects sharing a color",
                                               "two objects sharing a color", "two identical objects"]
    rates = rates_by_group(cases, [True, True, False, True, False])
    assert rates == {"one object": {"successes": 1, "cases": 1}, "two objects, distinct colors": {"successes": 1, "cases": 1},
                     "two objects sharing a color": {"successes": 1, "cases": 2}, "two identical objects": {"successes": 0, "cases": 1}}
    assert list(rates_by_group(cases[:2], [False, True])) == ["one object", "two objects, distinct colors"]  # empty groups left out
    with pytest.raises(ValueError, match="3 objects"):
        scene_group(case([SQUARE, CIRCLE, replace(SQUARE, center=(0.3, 0.75))], [SQUARE, CIRCLE, SQUARE]))


def test_background_groups_split_edits_by_the_source_background_and_object_count():
    from dreamsteer.benchmarks.toy_edits import BACKGROUND_GROUPS, EditCase, background_group, rates_by_group

    def case(background, objects):
        return EditCase("c", "color", render(background, objects), [replace(objects[0], color="blue"), *objects[1:]])

    cases = [case("white", [SQUARE]), case("gray", [SQUARE, CIRCLE]), case("gray", [CIRCLE, SQUARE]), case("black", [CIRCLE])]
    assert [background_group(c) for c in cases] == ["white, one object", "gray, two objects", "gray, two objects", "black, one object"]
    rates = rates_by_group(cases, [True, False, True, False], background_group, BACKGROUND_GROUPS)
    # in BACKGROUND_GROUPS order (white, black, gray, cyan), groups without cases left out
    assert rates == {"white, one object": {"successes": 1, "cases": 1}, "black, one object": {"successes": 0, "cases": 1},
                     "gray, two objects": {"successes": 1, "cases": 2}}
    assert list(rates) == ["white, one object", "black, one object", "gray, two objects"]
    with pytest.raises(ValueError, match="3 objects"):
        background_group(case("cyan", [SQUARE, CIRCLE, replace(SQUARE, center=(0.3, 0.75))]))


def test_a_part_whose_model_is_missing_is_reported_as_skipped(tmp_path):
    from dreamsteer.benchmarks import effects

    settings = effects.Settings(gligen_model=str(tmp_path / "no_such_model"))
    result = effects.run(["reground"], settings, tmp_path / "effects.md", tmp_path / "effects.json", tmp_path / "figs", tmp_path / "work")
    assert "cannot be loaded" in result["parts"]["reground"]["skipped"]
    md = (tmp_path / "effects.md").read_text()
    assert "Skipped: model" in md and "| edit | not run |" in md
    assert json.loads((tmp_path / "effects.json").read_text())["parts"]["reground"]["skipped"]


def _toy_weights_sha() -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(TOY_DIR.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@needs_toy
def test_parts_measured_on_other_weights_are_marked_as_such(tmp_path):
    """docs/effects.json as a file written before parts recorded their weights, its top-level weights not the shipped
    toy's: a run of another part keeps its parts, gives each the file's weights, and the markdown marks them."""
    from dreamsteer.benchmarks import effects

    earlier = json.loads((REPO_ROOT / "docs" / "effects.json").read_text())
    earlier["weights"] = "0123456789ab"
    for part in earlier["parts"].values():
        part.pop("weights", None)
    (tmp_path / "effects.json").write_text(json.dumps(earlier))
    settings = effects.Settings(gligen_model=str(tmp_path / "no_such_model"))
    result = effects.run(["reground"], settings, tmp_path / "effects.md", tmp_path / "effects.json", tmp_path / "figs", tmp_path / "work")
    measured = [name for name in ("edit", "steer", "personalize") if "skipped" not in earlier["parts"].get(name, {"skipped": 1})]
    assert measured and "skipped" in result["parts"]["reground"]
    assert all(result["parts"][name]["weights"] == "0123456789ab" for name in measured)
    md = (tmp_path / "effects.md").read_text()
    for name in measured:
        assert f"| {name} | measured {earlier['parts'][name]['finished']} | 0123456789ab: **not the model's weights now** ({_toy_weights_sha()}) |" in md
    assert f"**Measured on earlier weights**: {', '.join(measured)}." in md


@needs_toy
def test_edit_part_writes_every_methods_row(tmp_path):
    from dreamsteer.benchmarks import effects

    effects.main(["--part", "edit", "--n", "1", "--step-fraction", "0.01", "--workers", "1", "--md", str(tmp_path / "e.md"),
                  "--json", str(tmp_path / "e.json"), "--figures", str(tmp_path / "figs"), "--work", str(tmp_path / "work"),
                  "--editor-guidance", "2.5"])
    result = json.loads((tmp_path / "e.json").read_text())["parts"]["edit"]
    md = (tmp_path / "e.md").read_text()
    for kind in ("color", "shape", "two_colors"):
        assert set(result["table"][kind]) == {effects.NO_EDIT, *effects.EDIT_METHODS}
        assert (tmp_path / "figs" / f"edit_{kind}.png").is_file()
    for method in effects.EDIT_METHODS:
        assert md.count(f"| {method} |") == 4  # three kinds and all kinds
    assert "LUSD's claim" in md and "Ground-A-Score's claim" in md
    assert result["steps"]["dds"] == 2 and result["steps"]["ground_a_score"] == 5  # 1% of 200 and 500 steps
    records = [json.loads(p.read_text()) for p in (tmp_path / "work" / "edit" / "edits").glob("*.json")]
    assert len(records) == 3 * len(effects.EDIT_METHODS) and all(r["params"]["guidance"] == 2.5 for r in records)
    assert "--editor-guidance 2.5" in md and "every editor's guidance set to 2.5" in md
    assert "](figs/edit_color.png)" in md and "](e.json)" in md and "](effects/" not in md  # links relative to the markdown
    assert result["weights"] == _toy_weights_sha() and "not the model's weights now" not in md
    assert f"written with `--md {tmp_path / 'e.md'} --json {tmp_path / 'e.json'} --figures {tmp_path / 'figs'}`" in md


def test_an_edit_cases_seed_is_its_index_within_its_kind_whatever_n(tmp_path):
    from dreamsteer.benchmarks import effects
    from dreamsteer.benchmarks.toy_edits import edit_case, edit_jobs

    def seeds(n):
        cases = [edit_case(kind, (7, k, i), f"{kind}_{i:02d}") for k, kind in enumerate(effects.EDIT_KINDS) for i in range(n)]
        jobs = edit_jobs(cases, effects.EDIT_METHODS, tmp_path / f"src{n}", {})
        assert len(jobs) == len(cases) * len(effects.EDIT_METHODS)
        return {job["id"]: job["seed"] for job in jobs}

    two, three = seeds(2), seeds(3)
    for method in effects.EDIT_METHODS:
        for kind in effects.EDIT_KINDS:
            assert [two[f"{method}__{kind}_{i:02d}"] for i in range(2)] == [0, 1]
            assert three[f"{method}__{kind}_02"] == 2
    assert all(three[job_id] == seed for job_id, seed in two.items())


@needs_toy
def test_a_dds_color_edit_recolors_its_object_more_than_the_other_and_keeps_the_background():
    """The effect every table of docs/effects.md rests on, on the shipped weights: DDS moves the edited
    object's pixels several times more than the other object's and keeps the background color."""
    import torch

    from dreamsteer.benchmarks.toy_edits import edit_case, score_edit
    from dreamsteer.data.images import pil_to_tensor, tensor_to_pil
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.distill.config import method_defaults
    from dreamsteer.distill.editor import edit, editor_config
    from dreamsteer.metrics.detector import image_array

    torch.set_num_threads(1)
    backbone = load_backbone("toy")
    for seed in ((7, 0), (7, 1)):  # the first two-object color cases of this seed
        case = edit_case("color", seed, "case")
        assert len(case.scene.objects) == 2
        result = edit(backbone, pil_to_tensor(case.scene.image), case.scene.caption, case.target_prompt,
                      editor_config({**method_defaults("dds"), "steps": 100}), seed=0, progress=False)
        edited = tensor_to_pil(result.image)
        source, after = image_array(case.scene.image), image_array(edited)
        k = case.edited[0]
        change = [float(np.abs(after[m] - source[m]).mean()) for m in case.scene.masks]
        assert change[k] > 1.5 * change[1 - k], (case.target_prompt, change)
        assert score_edit(case, edited)["background_kept"]


@needs_toy
def test_the_subject_mask_finds_the_object_on_the_toy_model():
    """DDS-SM's and steering's mask words (`subject_words`) find the circle the subject edit changes, and the
    other object's words find the other object, not the circle (docs/toy.md, "Editing into the subject")."""
    import torch
    import torch.nn.functional as F

    from dreamsteer.benchmarks.effects import ref_prompt, steer_case
    from dreamsteer.data.images import pil_to_tensor
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.distill.prompts import subject_words
    from dreamsteer.distill.subject_mask import subject_mask

    backbone = load_backbone("toy")
    ious: dict[str, list[float]] = {"words": [], "other on its object": [], "other on the circle": []}
    for i in range(8):
        case = steer_case((7070, 1, i), f"s{i}", backbone.resolution)
        source = case.scene.caption
        words = subject_words(source, ref_prompt(case, SUBJECT.token))
        assert words == " ".join(source.split()[1:3])  # "<color> circle": the circle is the first object
        with torch.no_grad():
            z_src = backbone.encode_image(pil_to_tensor(case.scene.image)[None])

        def iou(token: str, truth: np.ndarray) -> float:
            mask = subject_mask(backbone, z_src, source, token).mask
            found = F.interpolate(mask, size=truth.shape, mode="nearest")[0, 0].numpy() > 0.5
            return float((found & truth).sum() / (found | truth).sum())

        ious["words"].append(iou(words, case.scene.masks[0]))
        if len(case.scene.masks) == 2:  # "... and a <color> <shape> on ...": the second object's words
            other = " ".join(source.split()[5:7])
            ious["other on its object"].append(iou(other, case.scene.masks[1]))
            ious["other on the circle"].append(iou(other, case.scene.masks[0]))
    assert len(ious["other on the circle"]) >= 3, ious
    assert np.mean(ious["words"]) >= 0.3, ious
    assert np.mean(ious["other on the circle"]) < 0.1 < np.mean(ious["other on its object"]), ious


def test_the_editor_guidance_also_sets_the_steerings_dds_s_guidance_and_nothing_else():
    from dreamsteer.benchmarks import effects
    from dreamsteer.train.config import compose

    base = effects.Settings()
    assert base.steering_overrides() == base.steer_overrides  # each one's own guidance: nothing added
    toy = effects.Settings(editor_guidance=1.5)
    added = toy.steering_overrides()[len(toy.steer_overrides):]
    assert toy.steering_overrides()[: len(toy.steer_overrides)] == toy.steer_overrides
    assert sorted(added) == ["edsd.guidance_ref=1.5", "edsd.guidance_src=1.5"]
    # the keys exist in the steer task's config, so compose applies them rather than fail
    cfg = compose("steer", list(added))
    assert (cfg.edsd.guidance_src, cfg.edsd.guidance_ref) == (1.5, 1.5)
    assert cfg.mode_shift.guidance_scale == compose("steer", []).mode_shift.guidance_scale  # sampling keeps its own
