"""Two-process CPU DDP (gloo, ddp_spawn, a fresh Trainer) of one personalization method."""
from __future__ import annotations

import json

import torch

from dreamsteer.data.samples import write_subject_set
from dreamsteer.train.config import compose
from dreamsteer.train.personalize import run


def test_two_process_ddp_trains_and_exports_once(tmp_path, capfd):
    from safetensors.torch import load_file

    write_subject_set(tmp_path / "subject", "cat", count=3)
    out = run(compose("personalize", [
        "method=textual_inversion", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of <sks> cat'",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn", "trainer.max_steps=2",
        "method.lr=5e-2", "logger=none", f"output_dir={tmp_path / 'run'}",
    ]))
    printed = capfd.readouterr().out
    assert printed.count("exported textual_inversion adapter to") == 1  # rank 0 only
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["training_steps"] == 2 and manifest["training"]["world_size"] == 2
    siblings = [p.name for p in out.parent.iterdir()]
    assert not [name for name in siblings if name.startswith(".adapter")]  # no temp export left behind
    learned = load_file(str(out / "learned_embeds.safetensors"))["<sks>"]
    checkpoint = torch.load(out.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["text_encoder.embeddings.token_embedding.new"], learned)


def test_a_pivot_stage_and_then_a_lora_run_under_two_process_ddp(tmp_path, capfd):
    """Pivotal tuning under DDP: the Textual Inversion stage and the LoRA each fit on both ranks and export once."""
    write_subject_set(tmp_path / "subject", "cat", count=3)
    out = run(compose("personalize", [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of <sks> cat'",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn", "trainer.max_steps=2", "pivot.max_steps=2",
        "pivot.method.initializer_token=cat", "logger=none", f"output_dir={tmp_path / 'run'}",
    ]))
    printed = capfd.readouterr().out
    assert printed.count("exported textual_inversion adapter to") == 1 and printed.count("exported lora adapter to") == 1
    stage = json.loads((tmp_path / "run" / "pivot" / "adapter" / "adapter.json").read_text())
    manifest = json.loads((out / "adapter.json").read_text())
    assert stage["training"]["world_size"] == manifest["training"]["world_size"] == 2 and manifest["pivot"]["tokens"] == ["<sks>"]
