"""Exported adapters used by other tasks: `sample adapter=...`, and the demo's quick LoRA."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from train.config import compose
from train.personalize import quick_lora
from train.sample import run as sample_run


def test_quick_lora_export_feeds_the_sample_task(tmp_path):
    adapter = quick_lora(tmp_path / "lora", steps=3, extra=["logger=none"])
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["method"] == "lora" and manifest["training_steps"] == 3
    assert manifest["instance_prompt"] == "a photo of sks cat"

    common = ["prompt='a photo of sks cat'", "num_images=1", "steps=2", "logger=none"]
    with_adapter = sample_run(compose("sample", [*common, f"adapter={adapter}", f"output_dir={tmp_path / 'a'}"]))
    without = sample_run(compose("sample", [*common, f"output_dir={tmp_path / 'b'}"]))
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (with_adapter, without))
    assert np.abs(a - b).max() > 0  # the trained LoRA changes the image
