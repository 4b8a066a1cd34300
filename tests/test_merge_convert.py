"""The `merge` and `convert` tasks, checked against diffusers' own LoRA loading (multi-adapter weights)."""
from __future__ import annotations

import json

import pytest
import torch

from dreamsteer.checkpoints import export_adapter
from dreamsteer.checkpoints.formats import LORA_FILE, LORA_KOHYA_FILE, SINGLE_FILE
from dreamsteer.checkpoints.lora_files import LoraFileError
from dreamsteer.diffusion.adapters import attach_adapter
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.convert import run as convert_run
from dreamsteer.train.merge import run as merge_run

PROMPT = "a photo of sks cat"


def _lora(tiny_dir, path, seed: int, **config):
    backbone = load_backbone(str(tiny_dir))
    attach_adapter(backbone, "lora", **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.adapter.trainable_parameters(backbone):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return export_adapter(backbone, path)


@pytest.fixture(scope="module")
def two_loras(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = _lora(tiny_dir, root / "a", 1, rank=4, alpha=8.0, text_encoder=True)
    b = _lora(tiny_dir, root / "b", 2, rank=2, alpha=1.0)
    return a, b


@torch.no_grad()
def _eps(pipe) -> torch.Tensor:
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = pipe.encode_prompt([PROMPT] * 2, "cpu", 1, False)[0]
    return pipe.unet(z, torch.tensor([10, 600]), encoder_hidden_states=emb).sample


def test_merge_bakes_weighted_loras_like_diffusers_multi_adapter(tiny_dir, two_loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    a, b = two_loras
    out = merge_run(compose("merge", [f"model.pretrained={tiny_dir}", f"loras=[{a},{b / LORA_KOHYA_FILE}]", "weights=[1.0,0.5]", f"out={tmp_path / 'merged'}"]))

    reference = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    reference.load_lora_weights(str(a), adapter_name="a")
    reference.load_lora_weights(str(b), weight_name=LORA_KOHYA_FILE, adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    expected = _eps(reference)
    base = _eps(StableDiffusionPipeline.from_pretrained(str(tiny_dir)))

    merged = StableDiffusionPipeline.from_pretrained(str(out))
    got = _eps(merged)
    assert torch.allclose(got, expected, atol=2e-5, rtol=0), (got - expected).abs().max()
    assert (got - base).abs().max() > 100 * (got - expected).abs().max()
    single = StableDiffusionPipeline.from_single_file(str(out / SINGLE_FILE), config=str(tiny_dir), local_files_only=True)
    assert torch.equal(_eps(single), got)
    record = json.loads((out / "merge.json").read_text())
    assert [x["weight"] for x in record["loras"]] == [1.0, 0.5] and record["layers_changed"]["text_encoder"] == 8
    card = (out / "README.md").read_text()
    assert f"`{a}` x 1.0" in card and f"`{SINGLE_FILE}` into `models/checkpoints/`" in card

    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        merge_run(compose("merge", [f"model.pretrained={tiny_dir}", f"loras=[{a}]", f"out={out}"]))
    with pytest.raises(ConfigError, match="2 weights for 1 LoRAs"):
        merge_run(compose("merge", [f"model.pretrained={tiny_dir}", f"loras=[{a}]", "weights=[1,2]", f"out={tmp_path / 'x'}"]))


def test_convert_between_diffusers_and_kohya_keeps_the_update(tiny_dir, two_loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    a, _ = two_loras
    expected = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    expected.load_lora_weights(str(a))
    expected = _eps(expected)

    common = [f"model.pretrained={tiny_dir}"]
    to_kohya = convert_run(compose("convert", [*common, f"lora={a / LORA_FILE}", "to=kohya", f"out={tmp_path / 'k.safetensors'}"]))
    to_diffusers = convert_run(compose("convert", [*common, f"lora={a / LORA_KOHYA_FILE}", "to=diffusers", f"out={tmp_path / 'd.safetensors'}"]))
    for path in (to_kohya, to_diffusers):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        got = _eps(pipe)
        assert torch.allclose(got, expected, atol=2e-6, rtol=0), (path.name, (got - expected).abs().max())

    with pytest.raises(ConfigError, match="exists; choose a new file name"):
        convert_run(compose("convert", [*common, f"lora={a}", f"out={to_kohya}"]))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_nope_to_q.lora_down.weight": torch.zeros(2, 4), "lora_unet_nope_to_q.lora_up.weight": torch.zeros(4, 2)}, str(foreign))
    with pytest.raises(LoraFileError, match=r"foreign.safetensors.*'lora_unet_nope_to_q' names no module"):
        convert_run(compose("convert", [*common, f"lora={foreign}", f"out={tmp_path / 'y.safetensors'}"]))
