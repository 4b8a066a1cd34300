"""Validation samples as PNG files, no sampling when nothing records it, CSV and W&B loggers."""
from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from PIL import Image

from dreamsteer.data.samples import write_subject_set
from dreamsteer.lit_modules.personalize import PersonalizeModule
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run


def overrides(tmp_path, *extra: str) -> list[str]:
    return [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        "trainer.max_steps=2", "trainer.log_every_n_steps=1", "validation.every_n_steps=1", "validation.steps=1",
        "validation.num_images=1", "export.enabled=false", *extra,
    ]


def test_validation_pngs_and_csv_metrics_and_no_sampling_without_a_recorder(tmp_path, monkeypatch):
    write_subject_set(tmp_path / "subject", "cat", count=1)
    run(compose("personalize", overrides(tmp_path, "logger=csv", f"output_dir={tmp_path / 'a'}", "validation.prompts=['a cat','a dog']")))
    for step in (1, 2):
        folder = tmp_path / "a" / "samples" / f"step{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == ["prompt0_0.png", "prompt1_0.png", "prompts.json"]
        assert Image.open(folder / "prompt1_0.png").size == (128, 128)  # the tiny model samples at 128 px
        assert json.loads((folder / "prompts.json").read_text())["prompts"] == ["a cat", "a dog"]
    with open(tmp_path / "a" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1"]

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although nothing records the images")

    monkeypatch.setattr(PersonalizeModule, "sample_images", no_sampling)
    run(compose("personalize", overrides(tmp_path, "logger=csv", f"output_dir={tmp_path / 'b'}", "validation.save_images=false")))
    assert not (tmp_path / "b" / "samples").exists() and (tmp_path / "b" / "csv" / "metrics.csv").is_file()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="logger.name': wandb is not installed"):
        run(compose("personalize", overrides(tmp_path, "logger=wandb", f"output_dir={tmp_path / 'w'}")))
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb (the optional extra) is not installed")
def test_wandb_offline_run_records_metrics_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_subject_set(tmp_path / "subject", "cat", count=1)
    run(compose("personalize", overrides(tmp_path, "logger=wandb", f"output_dir={tmp_path / 'w'}")))
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("*.wandb"))  # the run's record, to upload later with `wandb sync`
    assert [p for p in runs[0].rglob("*.png") if "validation" in str(p.relative_to(runs[0]))]  # media/images/validation/...
