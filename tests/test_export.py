"""Exported adapters used by other tasks: a LoRA personalized on the bundled photos feeds `sample adapter=...`;
its export carries the caption tag counts (kohya's ``ss_tag_frequency``) and the last validation images in
the model card."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dreamsteer.checkpoints.formats import LORA_KOHYA_FILE
from dreamsteer.checkpoints.safetensors_files import read_metadata
from dreamsteer.data.images import list_images
from dreamsteer.train.config import compose
from dreamsteer.data.samples import write_subject_set
from dreamsteer.train.personalize import run as personalize_run
from dreamsteer.train.sample import run as sample_run


def test_lora_export_feeds_the_sample_task(tmp_path):
    write_subject_set(tmp_path / "subject", "cat", count=4)
    first, second = list_images(tmp_path / "subject")[:2]
    first.with_suffix(".txt").write_text("a photo of sks cat, sofa")
    second.with_suffix(".txt").write_text("a photo of sks cat")
    adapter = personalize_run(compose("personalize", [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        "trainer.max_steps=3", "method.lr=1e-3", "logger=none", f"output_dir={tmp_path / 'lora'}",
        "validation.every_n_steps=3", "validation.num_images=1", "validation.steps=2",
    ]))
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["method"] == "lora" and manifest["training_steps"] == 3
    assert manifest["instance_prompt"] == "a photo of sks cat"
    tags = {"subject": {"a photo of sks cat": 2, "sofa": 1}}
    assert manifest["caption_tag_frequency"] == tags
    meta = read_metadata(adapter / LORA_KOHYA_FILE)
    assert json.loads(meta["ss_tag_frequency"]) == tags and meta["ss_steps"] == "3" and meta["ss_output_name"] == "adapter"
    assert "samples/0.png" in manifest["files"] and Image.open(adapter / "samples" / "0.png").size == (128, 128)  # the tiny model's resolution
    card = (adapter / "README.md").read_text()
    assert "![a photo of sks cat](samples/0.png)" in card and "<lora:lora_kohya:1>" in card and "load_lora_weights" in card

    common = ["prompt='a photo of sks cat'", "num_images=1", "steps=2", "logger=none"]
    with_adapter = sample_run(compose("sample", [*common, f"adapter={adapter}", f"output_dir={tmp_path / 'a'}"]))
    without = sample_run(compose("sample", [*common, f"output_dir={tmp_path / 'b'}"]))
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (with_adapter, without))
    assert np.abs(a - b).max() > 0  # the trained LoRA changes the image
