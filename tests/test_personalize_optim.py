"""Optimizers by name (AdamW, 8-bit AdamW, Lion, 8-bit Lion, Adafactor, Prodigy) and the text-encoder lr."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dreamsteer.data.samples import write_subject_set
from dreamsteer.lit_modules.optimizers import make_optimizer
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run, validate_config

CLASSES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "lion8bit": "Lion8bit", "adafactor": "Adafactor", "prodigy": "Prodigy"}


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_optimizer_minimizes_a_quadratic_with_its_group_lrs(name):
    if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        pytest.skip("prodigyopt (the optional extra) is not installed")
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 values: bitsandbytes keeps 8-bit states
    b = torch.nn.Parameter(torch.randn(64, 128))
    lr = 1.0 if name == "prodigy" else 1e-2
    optimizer = make_optimizer(name, [{"params": [a], "lr": lr}, {"params": [b], "lr": 0.0 if name != "prodigy" else lr}], (0.9, 0.999), 0.0, 1e-8)
    assert type(optimizer).__name__ == CLASSES[name]
    b0 = b.detach().clone()
    start = a.detach().square().sum()
    for _ in range(20):
        (a.square().sum() + b.square().sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert a.detach().square().sum() < 0.9 * start
    if name != "prodigy":
        assert torch.equal(b.detach(), b0)  # lr 0 in its group: the group lrs are honoured
    if name in ("adamw8bit", "lion8bit"):
        assert any(s.dtype == torch.uint8 for s in optimizer.state[a].values() if torch.is_tensor(s))


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is not None, reason="prodigyopt is installed")
def test_prodigy_without_its_package_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.name': optimizer 'prodigy' needs the prodigyopt package \(pip install 'dreamsteer\[prodigy\]'"):
        validate_config(compose("personalize", ["optim.name=prodigy", f"output_dir={tmp_path}"]))


def test_text_encoder_lr_gets_its_own_group_in_a_run(tmp_path):
    write_subject_set(tmp_path / "subject", "cat", count=1)
    run(compose("personalize", [
        "method=lora", "method.train_text_encoder=true", f"data.instance_dir={tmp_path / 'subject'}",
        "data.instance_prompt='a photo of sks cat'", f"output_dir={tmp_path / 'run'}", "logger=none", "trainer.max_steps=1",
        "optim.name=lion8bit", "method.lr=1e-4", "optim.text_encoder_lr=3e-5", "export.enabled=false",
    ]))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = list(checkpoint["state_dict"])  # the trainable parameters in optimizer order
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4, 3e-5]
    by_index = {i: n for i, n in enumerate(names)}
    assert all(by_index[i].startswith("unet.") for i in groups[0]["params"])
    assert all(by_index[i].startswith("text_encoder.") for i in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)
