"""`python -m train generate`: images, boxed images, side by side wirings from one seed, logs, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreamsteer.diffusion.gligen import LayoutError, NotGligenError
from tests.conftest import REPO_ROOT
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.generate import BOX_COLORS, draw_boxes, run

LAYOUT = ["phrases=[a red cat,a dog]", "boxes=[[0.125,0.25,0.5,0.875],[0.5625,0.125,0.9375,0.5]]"]  # whole pixels at 128


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_both_writes_wirings_side_by_side_from_one_seed(tmp_path):
    out = tmp_path / "both"
    manifest = run(compose("generate", [*LAYOUT, "wiring=both", "num_images=2", "steps=3", "beta=1.0", f"output_dir={out}"]))
    assert manifest["phrases"] == ["a red cat", "a dog"] and manifest["grounding_steps"] == 3
    assert json.loads((out / "generate.json").read_text()) == manifest
    for key in ("sequential", "sequential_boxes", "parallel", "parallel_boxes", "both", "both_boxes"):
        assert len(manifest["files"][key]) == 2 and all((out / name).is_file() for name in manifest["files"][key])
    seq, par, both = _pixels(out / "sequential_001.png"), _pixels(out / "parallel_001.png"), _pixels(out / "both_001.png")
    assert seq.shape == par.shape == (128, 128, 3) and both.shape == (128, 260, 3)
    assert np.array_equal(both[:, :128], seq) and np.array_equal(both[:, 132:], par)
    assert manifest["mean_abs_pixel_diff"] > 0 and not np.array_equal(seq, par)

    # Boxes drawn where the layout says, and nowhere else.
    boxed = _pixels(out / "sequential_001_boxes.png")
    # first box: columns 16..63, rows 32..111; second box: columns 72..119, rows 16..63
    assert tuple(boxed[100, 16]) == BOX_COLORS[0] and tuple(boxed[111, 30]) == BOX_COLORS[0] and tuple(boxed[90, 63]) == BOX_COLORS[0]
    assert tuple(boxed[40, 119]) == BOX_COLORS[1] and tuple(boxed[63, 100]) == BOX_COLORS[1]
    assert np.array_equal(boxed[:, 121:], seq[:, 121:]) and np.array_equal(boxed[70:110, 18:62], seq[70:110, 18:62])

    # TensorBoard got both wirings' images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"sequential/images", "parallel/images", "sequential/boxes", "parallel/boxes"} <= set(events.Tags()["images"])

    # The same seed alone gives the same sequential images.
    alone = tmp_path / "alone"
    run(compose("generate", [*LAYOUT, "wiring=sequential", "num_images=2", "steps=3", "beta=1.0", "logger=none", f"output_dir={alone}"]))
    assert np.array_equal(_pixels(alone / "sequential_001.png"), seq)
    assert not (alone / "tensorboard").exists() and not (alone / "parallel_000.png").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["phrases=[a cat]", "boxes=[[0.1,0.2,1.5,0.9]]"], LayoutError, r"boxes\[0\].*\[0, 1\]"),
        (["phrases=[a cat]", "boxes=[[0.6,0.2,0.4,0.9]]"], LayoutError, r"boxes\[0\].*x1 \(0.4\) must be greater than x0 \(0.6\)"),
        (["phrases=[a cat,a dog]", "boxes=[[0.1,0.2,0.5,0.9]]"], LayoutError, r"2 phrase\(s\) but 1 box"),
        (["wiring=diagonal"], ConfigError, "config key 'wiring'"),
        (["beta=1.5"], ConfigError, "config key 'beta'"),
        (["steps=0"], ConfigError, "config key 'steps'"),
        (["boxes=[[0.1,0.2,0.5,high]]"], ConfigError, r"config key 'boxes\[0\]'.*'high'"),
        (["model.pretrained=tiny", "wiring=parallel"], NotGligenError, "model 'tiny' is not a GLIGEN model"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_output(tmp_path, overrides, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run(compose("generate", [*overrides, f"output_dir={out}"]))
    assert not out.exists()


def test_draw_boxes_outlines_each_box_in_its_colour():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    boxed = np.asarray(draw_boxes(image, [[0.2, 0.2, 0.6, 1.0], [0.7, 0.0, 1.0, 0.5]], ["a", "b"]))
    assert tuple(boxed[30, 20]) == BOX_COLORS[0] and tuple(boxed[49, 40]) == BOX_COLORS[0] and tuple(boxed[30, 59]) == BOX_COLORS[0]
    assert tuple(boxed[20, 99]) == BOX_COLORS[1]
    assert tuple(boxed[30, 40]) == (0, 0, 0) and tuple(boxed[40, 80]) == (0, 0, 0)


def test_cli_generate_writes_images(tmp_path):
    env = dict(os.environ, DREAMSTEER_OUTPUTS=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "dreamsteer.train", "generate", "model.pretrained=tiny-gligen", "prompt=a cat on the grass",
         "phrases=[a cat]", "boxes=[[0.1,0.2,0.6,0.9]]", "wiring=parallel", "steps=2", f"output_dir={tmp_path / 'cli'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "cli" / "generate.json").read_text())
    assert manifest["files"]["parallel"] == ["parallel_000.png"] and manifest["phrases"] == ["a cat"]
    assert (tmp_path / "cli" / "parallel_000_boxes.png").is_file() and (tmp_path / "cli" / "tensorboard").is_dir()
