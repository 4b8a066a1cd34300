"""Exported adapters used by other tasks: a LoRA personalized on the bundled photos feeds `sample adapter=...`."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dreamsteer.train.config import compose
from dreamsteer.data.samples import write_subject_set
from dreamsteer.train.personalize import run as personalize_run
from dreamsteer.train.sample import run as sample_run


def test_lora_export_feeds_the_sample_task(tmp_path):
    write_subject_set(tmp_path / "subject", "cat", count=4)
    adapter = personalize_run(compose("personalize", [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        "trainer.max_steps=3", "method.lr=1e-3", "logger=none", f"output_dir={tmp_path / 'lora'}",
    ]))
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["method"] == "lora" and manifest["training_steps"] == 3
    assert manifest["instance_prompt"] == "a photo of sks cat"

    common = ["prompt='a photo of sks cat'", "num_images=1", "steps=2", "logger=none"]
    with_adapter = sample_run(compose("sample", [*common, f"adapter={adapter}", f"output_dir={tmp_path / 'a'}"]))
    without = sample_run(compose("sample", [*common, f"output_dir={tmp_path / 'b'}"]))
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (with_adapter, without))
    assert np.abs(a - b).max() > 0  # the trained LoRA changes the image
