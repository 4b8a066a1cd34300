"""Adapters (diffusion/adapters.py) and their exports (checkpoints/): attach, disable, train only what
they own, export, and reload bit-exactly through diffusers' own loaders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamsteer.checkpoints import AdapterLoadError, export_adapter, load_adapter
from dreamsteer.checkpoints.formats import CD_FILE, LORA_KOHYA_FILE, custom_diffusion_processors
from dreamsteer.diffusion.adapters import AdapterError, attach_adapter, fingerprints_match, model_fingerprint
from dreamsteer.diffusion.backbone import load_backbone

CASES = {
    "lora": (dict(rank=4, alpha=8.0, text_encoder=True), "a photo of sks cat"),
    "textual_inversion": (dict(tokens=["<sks>", "<zwx-style>"], num_vectors=2), "a photo of <sks> cat in <zwx-style>"),
    "custom_diffusion": (dict(modifier_tokens=["<new1>"], train_q_out=True), "a photo of <new1> cat"),
    "dreambooth": (dict(train_text_encoder=True), "a photo of sks cat"),
}


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 600][:batch])


def _perturb(backbone, scale: float = 0.05) -> None:
    """Move every trainable parameter, as training would (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backbone.adapter.trainable_parameters(backbone):
            p.add_(scale * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _unet_eps(backbone, prompt: str) -> torch.Tensor:
    z, t = _inputs()
    return backbone.unet(z, t, encoder_hidden_states=backbone.encode_prompt([prompt] * 2)).sample


def _all_params(backbone) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (("unet", backbone.unet), ("text_encoder", backbone.text_encoder), ("vae", backbone.vae)):
        for name, p in module.named_parameters():
            out[f"{prefix}.{name}"] = p
    return out


@pytest.mark.parametrize("kind", list(CASES))
def test_disabled_is_base_model_and_only_adapter_is_trainable(fresh_backbone, kind):
    config, prompt = CASES[kind]
    base_prompt = "a photo of a cat"
    base = _unet_eps(fresh_backbone, base_prompt)
    adapter = attach_adapter(fresh_backbone, kind, **config)
    assert fresh_backbone.adapter is adapter and adapter.kind == kind

    named = dict(adapter.named_trainable(fresh_backbone))
    trainable = {n for n, p in _all_params(fresh_backbone).items() if p.requires_grad}
    assert trainable == set(named) and trainable
    assert not any(n.startswith("vae.") for n in trainable)
    if kind == "textual_inversion":
        assert trainable == {"text_encoder.embeddings.token_embedding.new"}
        assert named["text_encoder.embeddings.token_embedding.new"].shape == (4, 64)  # 2 tokens x 2 vectors
    if kind == "custom_diffusion":
        assert all(".attn2.to_" in n or n.endswith("token_embedding.new") for n in trainable)
    if kind == "lora":
        assert all("lora_" in n for n in trainable)

    _perturb(fresh_backbone)
    adapted = _unet_eps(fresh_backbone, base_prompt if kind != "textual_inversion" else prompt)
    with fresh_backbone.adapter_disabled():
        disabled = _unet_eps(fresh_backbone, base_prompt)
    assert torch.equal(disabled, base)
    assert not torch.allclose(adapted, base, atol=1e-4)
    # the trained weights are back in place after the context
    assert torch.equal(_unet_eps(fresh_backbone, base_prompt if kind != "textual_inversion" else prompt), adapted)


def test_textual_inversion_keeps_every_other_row_bit_exact(fresh_backbone):
    before = fresh_backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    adapter = attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"], initializer_token="cat")
    module = fresh_backbone.text_encoder.get_input_embeddings()
    cat_id = fresh_backbone.tokenizer.encode("cat", add_special_tokens=False)[0]
    assert torch.equal(module.new.detach()[0], before[cat_id].float())
    opt = torch.optim.AdamW(adapter.trainable_parameters(fresh_backbone), lr=1e-1, weight_decay=1.0)
    for _ in range(3):
        emb = fresh_backbone.encode_prompt(["a photo of <sks> and a cat"])
        emb.square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = module.weight.detach()
    assert torch.equal(after[: before.shape[0]], before)  # weight decay touched nothing but the new row
    assert not torch.equal(after[-1], before[cat_id])


def test_several_initializer_words_start_the_vectors_in_turn(fresh_backbone):
    table = fresh_backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = {w: fresh_backbone.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("cat", "dog")}
    attach_adapter(fresh_backbone, "textual_inversion", tokens=["<a>", "<b>"], initializer_token="cat dog", num_vectors=3)
    rows = fresh_backbone.text_encoder.get_input_embeddings().new.detach()
    expected = torch.stack([table[ids[w]] for w in ("cat", "dog", "cat") * 2]).float()  # each token: word i mod 2
    assert torch.equal(rows, expected)


def test_multi_vector_prompts_are_expanded(fresh_backbone):
    attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"], num_vectors=3)
    ids = fresh_backbone.tokenize(["a photo of <sks>"])[0].tolist()
    new_ids = fresh_backbone.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1", "<sks>_2"])
    assert ids[4:7] == new_ids


@pytest.mark.parametrize("kind", list(CASES))
def test_export_reloads_through_diffusers_and_load_adapter(fresh_backbone, tiny_dir, tmp_path, kind):
    from diffusers import StableDiffusionPipeline

    config, prompt = CASES[kind]
    attach_adapter(fresh_backbone, kind, **config)
    _perturb(fresh_backbone)
    expected = _unet_eps(fresh_backbone, prompt)
    out = export_adapter(fresh_backbone, tmp_path / "export", {"instance_prompt": prompt, "training_steps": 7})

    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["method"] == kind and manifest["training_steps"] == 7 and manifest["instance_prompt"] == prompt
    assert manifest["base_model"] == fresh_backbone.source and manifest["tokens"] == fresh_backbone.adapter.tokens
    assert manifest["files"] and all((out / name).is_file() for name in manifest["files"])
    assert {"torch", "diffusers", "peft"} <= set(manifest["versions"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    # 1) diffusers' own loaders on a plain pipeline of the base model
    if kind == "dreambooth":
        pipe = StableDiffusionPipeline.from_pretrained(str(out))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        if kind == "lora":
            pipe.load_lora_weights(str(out))
        else:
            for token, name in manifest["token_files"].items():
                pipe.load_textual_inversion(str(out / name))
        if kind == "custom_diffusion":
            pipe.unet.set_attn_processor(custom_diffusion_processors(pipe.unet, out / CD_FILE))
    with torch.no_grad():
        z, t = _inputs()
        emb = pipe.encode_prompt([prompt] * 2, "cpu", 1, False)[0]
        theirs = pipe.unet(z, t, encoder_hidden_states=emb).sample
    tol = 1e-5 if kind == "custom_diffusion" else 0.0  # diffusers' CD processor computes attention its own way
    assert torch.allclose(theirs, expected, atol=tol, rtol=0), (theirs - expected).abs().max()

    # 2) our loader on a fresh backbone: bit-exact, frozen until asked
    other = load_backbone(str(tiny_dir))
    load_adapter(other, out)
    assert torch.equal(_unet_eps(other, prompt), expected)
    assert not any(p.requires_grad for p in _all_params(other).values())
    assert all(p.requires_grad for p in other.adapter.trainable_parameters(other))


def test_a1111_layouts_load_in_diffusers(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    # LoRA: kohya keys with alpha != rank
    lora = load_backbone(str(tiny_dir))
    attach_adapter(lora, "lora", rank=4, alpha=2.0, text_encoder=True)
    _perturb(lora)
    expected = _unet_eps(lora, "a photo of a cat")
    out = export_adapter(lora, tmp_path / "lora")
    from safetensors.torch import load_file

    keys = load_file(str(out / LORA_KOHYA_FILE))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.load_lora_weights(str(out), weight_name=LORA_KOHYA_FILE)
    with torch.no_grad():
        z, t = _inputs()
        theirs = pipe.unet(z, t, encoder_hidden_states=pipe.encode_prompt(["a photo of a cat"] * 2, "cpu", 1, False)[0]).sample
    assert torch.allclose(theirs, expected, atol=1e-6, rtol=0)

    # TI: A1111 {"emb_params": [n, D]} named after the token
    ti = load_backbone(str(tiny_dir))
    attach_adapter(ti, "textual_inversion", tokens=["<sks>"], num_vectors=2)
    _perturb(ti)
    expected = _unet_eps(ti, "a photo of <sks>")
    out = export_adapter(ti, tmp_path / "ti")
    assert set(load_file(str(out / "a1111" / "sks.safetensors"))) == {"emb_params"}
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.load_textual_inversion(str(out / "a1111" / "sks.safetensors"), token="<sks>")
    with torch.no_grad():
        theirs = pipe.unet(z, t, encoder_hidden_states=pipe.encode_prompt(["a photo of <sks>"] * 2, "cpu", 1, False)[0]).sample
    assert torch.equal(theirs, expected)


def test_load_adapter_rejects_wrong_base_corrupt_files_and_second_adapter(fresh_backbone, tmp_path):
    attach_adapter(fresh_backbone, "lora", rank=2)
    _perturb(fresh_backbone)
    out = export_adapter(fresh_backbone, tmp_path / "lora")

    other_model = load_backbone("tiny:1", cache_dir=Path(tmp_path / "cache"))
    assert not fingerprints_match(model_fingerprint(other_model), model_fingerprint(load_backbone(fresh_backbone.source)))
    with pytest.raises(AdapterLoadError, match="trained on base model"):
        load_adapter(other_model, out)

    with pytest.raises(AdapterLoadError, match="already has a lora adapter"):
        load_adapter(fresh_backbone, out)

    weights = out / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="does not match its sha256"):
        load_adapter(load_backbone(fresh_backbone.source), out)
    with pytest.raises(FileNotFoundError, match="no adapter.json"):
        load_adapter(load_backbone(fresh_backbone.source), tmp_path)


def test_fingerprint_is_dtype_insensitive(tiny_dir, tiny_backbone):
    half = load_backbone(str(tiny_dir), dtype="bf16")
    assert fingerprints_match(model_fingerprint(half), model_fingerprint(tiny_backbone))


def test_bad_tokens_are_rejected_before_anything_changes(fresh_backbone):
    size = len(fresh_backbone.tokenizer)
    with pytest.raises(AdapterError, match="already exists in the tokenizer's vocabulary"):
        attach_adapter(fresh_backbone, "textual_inversion", tokens=["cat"])
    with pytest.raises(AdapterError, match="must be a single token"):
        attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"], initializer_token="xqzv")
    with pytest.raises(AdapterError, match="'xqzv' must be a single token"):
        attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"], initializer_token="cat xqzv", num_vectors=2)
    with pytest.raises(AdapterError, match="has 2 words for 1 vector"):
        attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"], initializer_token="cat dog")
    with pytest.raises(AdapterError, match="initializer token is empty"):
        attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>"], initializer_token=" ")
    with pytest.raises(AdapterError, match="already exists"):
        attach_adapter(fresh_backbone, "custom_diffusion", modifier_tokens=["sks"])
    assert fresh_backbone.adapter is None and len(fresh_backbone.tokenizer) == size
    attach_adapter(fresh_backbone, "lora")
    with pytest.raises(AdapterError, match="already has a lora adapter"):
        attach_adapter(fresh_backbone, "dreambooth")


@pytest.mark.parametrize("kind", ["lora", "custom_diffusion"])
def test_attention_recorder_sees_the_adapter(fresh_backbone, kind):
    from dreamsteer.distill.attention import AttentionRecorder, list_attention_layers, select_layers

    attach_adapter(fresh_backbone, kind)
    _perturb(fresh_backbone)
    expected = _unet_eps(fresh_backbone, "a photo of a cat")
    layers = list_attention_layers(fresh_backbone.unet)
    with AttentionRecorder(fresh_backbone.unet, cross=select_layers(layers, "cross", ("down", "mid", "up"))) as rec:
        got = _unet_eps(fresh_backbone, "a photo of a cat")
        assert rec.cross_maps
    assert torch.allclose(got, expected, atol=1e-5)
    with fresh_backbone.adapter_disabled():
        base = _unet_eps(fresh_backbone, "a photo of a cat")
    assert not torch.allclose(got, base, atol=1e-4)


def test_text_encoder_lora_exports_are_refused_under_refusing_transformers(fresh_backbone, tmp_path, transformers_refusing_peft):
    manifest = {"method": "lora", "base_model_fingerprint": {}, "adapter_config": {"rank": 4, "text_encoder": True}, "files": {}}
    (tmp_path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterLoadError, match=r"adapter folder .*: text-encoder LoRA cannot run with transformers 5\.24\.0 and peft 0\.21\.2"):
        load_adapter(fresh_backbone, tmp_path)
    with pytest.raises(AdapterError, match="requires peft >= 0.22.0"):
        attach_adapter(fresh_backbone, "lora", rank=4, text_encoder=True)
    assert fresh_backbone.adapter is None and not hasattr(fresh_backbone.unet, "peft_config")
    attach_adapter(fresh_backbone, "lora", rank=4)  # UNet-only LoRA goes through diffusers: unaffected


def test_a_dreambooth_export_loads_into_a_half_precision_backbone_in_half_precision(fresh_backbone, tiny_dir, tmp_path):
    attach_adapter(fresh_backbone, "dreambooth", train_text_encoder=True)
    _perturb(fresh_backbone)
    out = export_adapter(fresh_backbone, tmp_path / "export")
    trained = {"unet": fresh_backbone.unet.state_dict(), "text_encoder": fresh_backbone.text_encoder.state_dict()}

    half = load_backbone(str(tiny_dir), dtype="fp16")
    load_adapter(half, out)
    for name in ("unet", "text_encoder"):
        module = getattr(half, name)
        assert {p.dtype for p in module.parameters()} == {torch.float16}, name
        # the export's weights, not the base's, and cast rather than reinterpreted
        key, weight = next((k, v) for k, v in trained[name].items() if v.dtype == torch.float32 and v.dim() > 1)
        assert torch.equal(module.state_dict()[key], weight.half()), (name, key)
    with torch.no_grad():  # and it runs: no fp32 text encoder feeding an fp16 UNet
        z, t = _inputs()
        half.unet(z.half(), t, encoder_hidden_states=half.encode_prompt(["a photo of sks cat"] * 2)).sample
