"""The main job end to end, with few steps: every stage's outputs exist and chain together."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from dreamsteer.train.config import compose
from tests.conftest import REPO_ROOT


def test_demo_runs_every_stage(tmp_path):
    from dreamsteer.train.demo import run

    cfg = compose("demo", [
        "world=photo", "personalize_steps=2", "steer_steps=2", "edit_steps=2", "logger=none",
        "steer_overrides=['mode_shift.n_ms=1','mode_shift.sampling_steps=3']",
        f"output_dir={tmp_path}",
    ])
    result = run(cfg)
    steered = json.loads((result["steered_adapter"] / "adapter.json").read_text())
    baseline = json.loads((result["adapter"] / "adapter.json").read_text())
    assert baseline["method"] == steered["method"] == "lora"
    assert "steering" in steered and "steering" not in baseline
    assert (tmp_path / "2_steer" / "mode_shift_unguided.png").is_file()  # the demo shows guided vs unguided
    for label in ("baseline", "steered"):
        record = json.loads((tmp_path / f"3_edit_{label}" / "photo.json").read_text())
        assert record["method"] == "dds_sm"
    assert json.loads((tmp_path / "3_edit_steered" / "photo.json").read_text())["adapter"] == str(result["steered_adapter"])
    metrics = json.loads((tmp_path / "4_evaluate" / "metrics.json").read_text())
    assert metrics  # both runs evaluated
    assert (tmp_path / "4_evaluate" / "report.html").is_file()
    summary = Image.open(tmp_path / "demo_summary.png")
    assert summary.width == 4 * 128


def test_toy_world_demo_chains_the_rendered_subject_and_scene(tmp_path):
    """The toy world's path on the tiny model (the trained toy weights are tested in test_toy_floors):
    rendered subject photos with captions, the scene's prompts, detector metrics, the summary."""
    from dreamsteer.data.scenes import SUBJECT
    from dreamsteer.train.demo import run

    cfg = compose("demo", [
        "world=toy", "model=tiny", "subject_images=2", "personalize_steps=1", "steer_steps=1", "edit_steps=1", "logger=none",
        "scene_objects=[green square, purple circle]", "personalize_overrides=['pivot.method.initializer_token=cat']",  # a tiny-vocabulary word
        "steer_overrides=['mode_shift.n_ms=1','mode_shift.sampling_steps=2']", f"output_dir={tmp_path}",
    ])
    result = run(cfg)
    record = json.loads((tmp_path / "3_edit_steered" / "photo.json").read_text())
    assert record["source_prompt"] == "a green square and a purple circle on a cyan background"
    # toy_lora trains on its pivot word, which the target prompt and the photos' captions name
    assert record["target_prompt"] == f"a green square and a <sks> {SUBJECT.class_word} on a cyan background"
    assert (tmp_path / "data" / "subject" / "subject_00.txt").read_text().startswith(f"a <sks> {SUBJECT.class_word}")
    stage = json.loads((tmp_path / "1_personalize" / "pivot" / "adapter" / "adapter.json").read_text())
    assert stage["training_steps"] == 1  # personalize_steps bounds the pivot stage too
    assert record["params"]["guidance"] == 7.5  # the tiny model has no DDS-SM recipe: the editor's defaults
    assert sorted(p.name for p in (tmp_path / "data" / "subject").iterdir()) == ["subject_00.png", "subject_00.txt", "subject_01.png", "subject_01.txt"]
    metrics = json.loads((tmp_path / "4_evaluate" / "metrics.json").read_text())
    assert set(metrics["steered"]) >= {"subject_score", "subject", "others_kept", "background_kept", "outside_change"}
    assert Image.open(tmp_path / "demo_summary.png").width == 5 * 128
    assert result["timings"]


def test_toy_world_refuses_a_scene_without_the_subjects_class(tmp_path):
    from dreamsteer.train.config import ConfigError
    from dreamsteer.train.demo import run

    with pytest.raises(ConfigError, match="scene_objects"):
        run(compose("demo", ["world=toy", "model=tiny", "scene_objects=[green square]", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"scene_objects\[0\]"):
        run(compose("demo", ["world=toy", "model=tiny", "scene_objects=[orange circle]", f"output_dir={tmp_path}"]))


@pytest.mark.skipif(not (REPO_ROOT / "diffusion" / "builtin" / "toy" / "model_index.json").is_file(), reason="the toy weights are not shipped here")
def test_toy_demo_edits_with_the_toy_models_editor_recipe(tmp_path):
    """On `toy` the demo's DDS-SM edits take conf/experiment/toy_dds_sm.yaml (guidance 1.5), as `train edit experiment=toy_dds_sm`."""
    from dreamsteer.train.demo import run

    run(compose("demo", [
        "world=toy", "subject_images=2", "personalize_steps=1", "steer_steps=1", "edit_steps=1", "logger=none", "evaluate=false",
        "steer_overrides=['mode_shift.n_ms=1','mode_shift.sampling_steps=2']", f"output_dir={tmp_path}",
    ]))
    for label in ("baseline", "steered"):
        params = json.loads((tmp_path / f"3_edit_{label}" / "photo.json").read_text())["params"]
        assert params["method"] == "dds_sm" and params["guidance"] == 1.5 and params["steps"] == 1


def test_the_demo_runs_its_stages_at_its_thread_count_and_gives_the_callers_back(tmp_path, monkeypatch):
    """`threads` holds for every stage (they run in the demo's process) and the caller's count returns
    afterwards, also when a stage fails; threads < 1 is refused before anything runs."""
    import torch

    from dreamsteer.train import personalize
    from dreamsteer.train.config import ConfigError
    from dreamsteer.train.demo import run

    seen = []

    def personalize_run(cfg):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop after the first stage")

    monkeypatch.setattr(personalize, "run", personalize_run)
    before = torch.get_num_threads()
    wanted = before + 1
    with pytest.raises(RuntimeError, match="stop after the first stage"):
        run(compose("demo", ["world=photo", "logger=none", f"threads={wanted}", f"output_dir={tmp_path / 'a'}"]))
    assert seen == [wanted]
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="stop after the first stage"):
        run(compose("demo", ["world=photo", "logger=none", "threads=null", f"output_dir={tmp_path / 'b'}"]))
    assert seen == [wanted, before]
    with pytest.raises(ConfigError, match="'threads'"):
        run(compose("demo", ["world=photo", "threads=0", f"output_dir={tmp_path / 'c'}"]))
    assert not (tmp_path / "c").exists()
    assert seen == [wanted, before]
