"""`compile.unet`: the UNet's forward runs through torch.compile (here the quick `eager` backend)."""
from __future__ import annotations

import pytest
import torch

from dreamsteer.data.samples import write_subject_set
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run, validate_config


def test_compiled_unet_trains_through_dynamo_with_the_uncompiled_result(tmp_path):
    import torch._dynamo

    write_subject_set(tmp_path / "subject", "cat", count=1)
    base = [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        "logger=none", "trainer.max_steps=1", "export.enabled=false", "method.lr=1e-3",
    ]
    run(compose("personalize", [*base, f"output_dir={tmp_path / 'plain'}"]))
    torch._dynamo.reset()
    run(compose("personalize", [*base, f"output_dir={tmp_path / 'compiled'}", "compile.unet=true", "compile.backend=eager"]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo captured the UNet's forward
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"] for d in ("plain", "compiled"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    torch._dynamo.reset()

    with pytest.raises(ConfigError, match="compile.backend"):
        validate_config(compose("personalize", [*base, f"output_dir={tmp_path}", "compile.unet=true", "compile.backend=nope"]))
