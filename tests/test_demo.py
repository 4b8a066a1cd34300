"""The main job end to end, with few steps: every stage's outputs exist and chain together."""
from __future__ import annotations

import json

from PIL import Image

from dreamsteer.train.config import compose


def test_demo_runs_every_stage(tmp_path):
    from dreamsteer.train.demo import run

    cfg = compose("demo", [
        "personalize_steps=2", "steer_steps=2", "edit_steps=2", "logger=none",
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
