"""EMA of the trainable weights: the formula, the exported weights (EMA or raw), checkpoints."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dreamsteer.checkpoints import load_adapter
from dreamsteer.data.samples import write_subject_set
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.lit_modules.personalize import MODULES
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.export import run as export_run
from dreamsteer.train.personalize import run, validate_config


def loaded_state(tiny_dir, adapter_dir) -> dict[str, torch.Tensor]:
    backbone = load_backbone(str(tiny_dir))
    load_adapter(backbone, adapter_dir)
    return {k: v.float() for k, v in backbone.adapter.trainable_state_dict(backbone).items()}


def test_ema_follows_the_formula_is_exported_and_raw_stays_selectable(tmp_path, tiny_dir):
    write_subject_set(tmp_path / "subject", "cat", count=2)
    overrides = [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        f"output_dir={tmp_path / 'run'}", "logger=none", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1",
        "trainer.keep_all_checkpoints=true", "method.lr=1e-2", "ema.enabled=true", "ema.decay=0.3",
    ]
    out = run(compose("personalize", overrides))
    initial = MODULES["lora"](OmegaConf.to_container(validate_config(compose("personalize", overrides))))
    w0 = {k: v.clone() for k, v in initial.trainable_state_dict().items()}
    steps = [torch.load(tmp_path / "run" / "checkpoints" / f"step{n:06d}.ckpt", map_location="cpu", weights_only=True) for n in (1, 2, 3)]

    expected = dict(w0)
    for n, checkpoint in enumerate(steps, start=1):
        d = min(0.3, (1 + n) / (10 + n))  # warmup: 2/11, 3/12, then the 0.3 cap (4/13 > 0.3)
        expected = {k: d * expected[k] + (1 - d) * checkpoint["state_dict"][k] for k in expected}
        assert checkpoint["ema"]["updates"] == n
        for k in expected:
            assert torch.allclose(checkpoint["ema"]["shadow"][k], expected[k], rtol=1e-5, atol=1e-7), k
    raw = steps[-1]["state_dict"]
    assert any(not torch.allclose(expected[k], raw[k]) for k in raw if "lora_B" in k)  # the average lags the weights

    exported = loaded_state(tiny_dir, out)  # ema.export=ema (default): the export holds the averages
    assert exported.keys() == raw.keys()
    assert all(torch.allclose(exported[k], expected[k], atol=1e-7) for k in raw)
    as_raw = export_run(compose("export", [f"ckpt={tmp_path / 'run'}", f"dir={tmp_path / 'raw'}", "weights=raw"]))
    reloaded_raw = loaded_state(tiny_dir, as_raw)
    assert all(torch.equal(reloaded_raw[k], raw[k]) for k in raw)
    as_ema = export_run(compose("export", [f"ckpt={tmp_path / 'run'}", f"dir={tmp_path / 'ema'}"]))
    reloaded_ema = loaded_state(tiny_dir, as_ema)
    assert all(torch.equal(reloaded_ema[k], exported[k]) for k in raw)

    with pytest.raises(ValueError, match="holds no EMA state"):  # an EMA run cannot resume a checkpoint without one
        module = MODULES["lora"](OmegaConf.to_container(validate_config(compose("personalize", overrides))))
        module.on_load_checkpoint({"state_dict": raw})
    with pytest.raises(ConfigError, match="ema.decay"):
        validate_config(compose("personalize", [*overrides, "ema.decay=1.0"]))
