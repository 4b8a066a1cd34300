"""Export folders as other tools and users meet them: permissions, reproducible bytes, the base
model's scheduler, kohya metadata and hashes (recomputed here the way kohya does), the
``text_model.`` text-encoder layout, ``use_with`` and the model card."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from dreamsteer.checkpoints import export_adapter, kohya
from dreamsteer.checkpoints.formats import LORA_FILE, LORA_KOHYA_FILE, SINGLE_FILE
from dreamsteer.data.files import write_json_atomic
from dreamsteer.diffusion.adapters import attach_adapter
from dreamsteer.diffusion.backbone import load_backbone


def _perturb(backbone) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backbone.adapter.trainable_parameters(backbone):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_v2_dir(tmp_path_factory) -> Path:
    """The tiny model made SD-2.x-like: OpenCLIP's ``gelu`` text encoder, linear attention projections,
    a v-prediction PNDM scheduler (not the DDPM scheduler training uses)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamsteer.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(3)
    text_config = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    torch.manual_seed(4)
    pipe = StableDiffusionPipeline(
        vae=pipe.vae, tokenizer=pipe.tokenizer, text_encoder=CLIPTextModel(text_config),
        unet=UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True}),
        scheduler=PNDMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction", skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = tmp_path_factory.mktemp("tiny_v2") / "model"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_exports_and_atomic_writes_respect_the_umask(fresh_backbone, tmp_path):
    attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"])
    old = os.umask(0o002)  # group-writable: neither mkdtemp's 0700 nor the usual 022 result
    try:
        out = export_adapter(fresh_backbone, tmp_path / "ti")
        json_file = write_json_atomic({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    modes = _modes(out)
    assert modes.pop(".") == 0o775 and modes.pop("a1111") == 0o775
    assert modes and set(modes.values()) == {0o664}, modes
    assert stat.S_IMODE(json_file.stat().st_mode) == 0o664


def test_lora_export_twice_is_byte_identical_with_kohya_metadata_and_hashes(fresh_backbone, tmp_path):
    attach_adapter(fresh_backbone, "lora", rank=4, alpha=2.0, text_encoder=True)
    _perturb(fresh_backbone)
    extra = {"training_steps": 12, "training": {"resolution": 64},
             "caption_tag_frequency": kohya.tag_frequency({"photos": ["sks cat, sofa", "sks cat"]})}
    first = export_adapter(fresh_backbone, tmp_path / "a" / "my-cat", extra)
    second = export_adapter(fresh_backbone, tmp_path / "b" / "my-cat", extra)
    names = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert LORA_FILE in names and LORA_KOHYA_FILE in names and "README.md" in names
    for name in names:
        if name != "adapter.json":  # holds the creation time
            assert (first / name).read_bytes() == (second / name).read_bytes(), name

    manifest = json.loads((first / "adapter.json").read_text())
    assert manifest["use_with"] == {"diffusers": [LORA_FILE], "a1111": [LORA_KOHYA_FILE], "comfyui": [LORA_KOHYA_FILE], "kohya": [LORA_KOHYA_FILE]}
    path = first / LORA_KOHYA_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "my-cat" and meta["ss_steps"] == "12" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"]) == {"photos": {"sks cat": 2, "sofa": 1}}
    # kohya: the addnet hash is the sha256 of everything after the header; the legacy hash reads
    # 64 KiB at 1 MiB of the file written with only the ss_* metadata
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header :]).hexdigest()
    kohya_bytes = save(load_file(str(path)), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000 : 0x110000]).hexdigest()[:8]
    # the diffusers file: text-encoder LoRA keys in the text_model.* layout every transformers release names
    text_keys = [k for k in load_file(str(first / LORA_FILE)) if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.") for k in text_keys)


def test_legacy_hash_reads_past_the_first_mebibyte():
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32).reshape(1000, 400)}
    meta = kohya.lora_metadata(tensors, rank=4, alpha=4, v2=True, v_prediction=True, base_model="b", output_name="o", resolution=768, steps=3)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    kohya_bytes = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(kohya_bytes) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8] != hashlib.sha256(b"").hexdigest()[:8]


def test_sd2_lora_says_v2(tiny_v2_dir, tmp_path):
    backbone = load_backbone(str(tiny_v2_dir))
    attach_adapter(backbone, "lora", rank=2)
    out = export_adapter(backbone, tmp_path / "lora")
    with safe_open(str(out / LORA_KOHYA_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"


def test_dreambooth_keeps_the_base_scheduler_and_names_text_weights_with_text_model(tiny_v2_dir, tmp_path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    backbone = load_backbone(str(tiny_v2_dir))
    attach_adapter(backbone, "dreambooth", train_text_encoder=True)
    _perturb(backbone)
    out = export_adapter(backbone, tmp_path / "db", {"instance_prompt": "a photo of sks cat"})
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    base = json.loads((tiny_v2_dir / "scheduler" / "scheduler_config.json").read_text())
    assert type(pipe.scheduler) is PNDMScheduler
    assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == {k: v for k, v in base.items() if not k.startswith("_")}

    state = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in state)  # transformers 4.x's layout (5.x loads it too)
    model, info = CLIPTextModel.from_pretrained(str(out / "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = backbone.text_encoder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # transformers 4.x's CLIPTokenizer reads vocab.json + merges.txt (5.x writes only tokenizer.json)
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    assert vocab == {t: i for t, i in backbone.tokenizer.get_vocab().items() if t in vocab} and len(vocab) >= len(backbone.tokenizer) - 2
    merges = (out / "tokenizer" / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) > 1 and all(len(m.split(" ")) == 2 for m in merges[1:])

    # the single file in SD 2.x's layout (OpenCLIP text encoder, q/k/v stacked) loads back weight for weight
    single = StableDiffusionPipeline.from_single_file(str(out / SINGLE_FILE), config=str(tiny_v2_dir), local_files_only=True)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in load_file(str(out / SINGLE_FILE))
    for name in ("unet", "text_encoder", "vae"):
        mine, loaded = getattr(backbone, name).state_dict(), getattr(single, name).state_dict()
        assert set(mine) == set(loaded) and all(torch.equal(loaded[k], v) for k, v in mine.items()), name

    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["use_with"]["a1111"] == [SINGLE_FILE] == manifest["use_with"]["comfyui"]
    again = export_adapter(backbone, tmp_path / "again" / "db", {"instance_prompt": "a photo of sks cat"})
    for path in out.rglob("*"):
        if path.is_file() and path.name != "adapter.json":
            assert path.read_bytes() == (again / path.relative_to(out)).read_bytes(), path
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "instance_prompt: \"a photo of sks cat\"" in card
    assert f"`{SINGLE_FILE}` into `models/Stable-diffusion/`" in card and "from_pretrained" in card
