"""LoRA variants through peft (DoRA, LoHa, LoKr), convolution targets and per-module rank / alpha: training,
export, reload (ours and diffusers'), and the kohya / LyCORIS file read by ComfyUI's rules, re-implemented here
from ``comfy/weight_adapter/{lora,loha,lokr,base}.py`` (not our code):

- a module ``lora_unet_<diffusers module with _>`` patches that layer's weight ``W`` (``comfy/lora.py``);
- LoRA: ``dW = (alpha / r) up.flatten(1) @ down.flatten(1)``, ``r`` = rows of ``lora_down``;
- DoRA (``dora_scale`` of one value per output row): ``W' = dora_scale * V / ||V||_row``, ``V = W + dW``
  (LyCORIS' ``wd_on_out``; ComfyUI's own branch divides by ``||W||``, see `test_variant_files_follow_comfyui_rules`);
- LoHa: ``dW = (alpha / r) (w1a @ w1b) * (w2a @ w2b)``, ``r`` = rows of ``hada_w1_b``;
- LoKr: ``dW = s kron(w1, w2)``, a factor either whole or ``a @ b``; ``s = alpha / r`` with ``r`` the rows of the
  last factored ``_b``, else 1.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dreamsteer.checkpoints import export_adapter, load_adapter
from dreamsteer.checkpoints.formats import LORA_FILE, LORA_KOHYA_FILE, PEFT_FILE
from dreamsteer.checkpoints.safetensors_files import read_metadata
from dreamsteer.data.samples import write_subject_set
from dreamsteer.diffusion.adapters import AdapterError, attach_adapter
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run, validate_config

PROMPT = "a photo of sks cat"
VARIANTS = ("lora", "dora", "loha", "lokr")
# conv layers of the resnets at their own rank / alpha, a rank pattern and an alpha pattern on top
OPTIONS = ["method.rank=2", "method.alpha=3", "method.conv_target_modules=[conv1,conv_shortcut]", "method.conv_rank=3",
           "method.conv_alpha=1.5", "method.rank_pattern={attn2.to_k: 5}", "method.alpha_pattern={attn1.to_q: 7}"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 600])


@torch.no_grad()
def _eps(backbone) -> torch.Tensor:
    z, t = _inputs()
    return backbone.unet(z, t, encoder_hidden_states=backbone.encode_prompt([PROMPT] * 2)).sample


def _train(tmp_path, variant: str, extra: list[str] = (), options: list[str] = OPTIONS):
    write_subject_set(tmp_path / "subject", "cat", count=1)
    return run(compose("personalize", [
        "method=lora", f"method.variant={variant}", *options, f"data.instance_dir={tmp_path / 'subject'}",
        f"data.instance_prompt='{PROMPT}'", f"output_dir={tmp_path / 'run'}", "logger=none", "trainer.max_steps=2", "method.lr=1e-2",
        "validation.every_n_steps=0", "progress=false", *extra,
    ]))


def _peft_layers(unet) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


def _merged_weights(backbone) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as peft merges it (``merge()``: DoRA's full formula included)."""
    out = {}
    for name, layer in _peft_layers(backbone.unet).items():
        layer.merge(adapter_names=["default"])
        out[name] = layer.get_base_layer().weight.detach().clone()
        layer.unmerge()
    return out


def _file_weight(tensors: dict[str, torch.Tensor], key: str, weight: torch.Tensor, comfyui_dora_norm: bool = False) -> torch.Tensor:
    """The layer's weight after the file's module `key` is applied (module docstring; strength 1)."""
    t = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (alpha / t["hada_w1_b"].shape[0])
        return weight + delta.reshape(weight.shape)
    if any(k.startswith("lokr_") for k in t):
        dim = None
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w1" not in t:
            dim = t["lokr_w1_b"].shape[0]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if "lokr_w2" not in t:
            dim = t["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return weight + scale * torch.kron(w1, w2).reshape(weight.shape)
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
    if "dora_scale" not in t:
        return weight + delta
    scale = t["dora_scale"]
    assert scale.shape == (weight.shape[0],) + (1,) * (weight.dim() - 1)  # one value per output row, 2-d or 4-d
    adapted = weight + delta
    norm = (weight if comfyui_dora_norm else adapted).flatten(1).norm(dim=1).reshape(scale.shape)
    return adapted * scale / norm


def _reloaded(tiny_dir, out):
    backbone = load_backbone(str(tiny_dir))
    manifest = load_adapter(backbone, out)
    return backbone, manifest


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_exports_and_reloads_with_the_same_prediction(variant, tmp_path, tiny_dir, tiny_backbone):
    out = _train(tmp_path, variant)
    backbone, manifest = _reloaded(tiny_dir, out)
    config = manifest["adapter_config"]
    assert config["variant"] == variant and config["rank_pattern"] == {"attn2.to_k": 5} and config["conv_rank"] == 3
    trained = _eps(backbone)
    base = _eps(tiny_backbone)
    assert (trained - base).abs().max() > 1e-4  # two steps moved the model
    with backbone.adapter_disabled():
        assert torch.equal(_eps(backbone), base)

    # the reload computes what the trained model computed: the last checkpoint's weights, attached afresh
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    fresh = load_backbone(str(tiny_dir))
    attach_adapter(fresh, "lora", **config)
    fresh.adapter.load_trainable_state_dict(fresh, checkpoint)
    assert torch.equal(_eps(fresh), trained)

    # per-module rank and alpha, as peft built them
    layers = _peft_layers(backbone.unet)
    k = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    q = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    conv = layers["down_blocks.1.resnets.0.conv_shortcut"]
    alphas = lambda m: m.lora_alpha if hasattr(m, "lora_alpha") else m.alpha  # noqa: E731
    assert (k.r["default"], q.r["default"], conv.r["default"]) == (5, 2, 3)
    assert (alphas(k)["default"], alphas(q)["default"], alphas(conv)["default"]) == (3.0, 7.0, 1.5)
    assert isinstance(conv.get_base_layer(), torch.nn.Conv2d) and "down_blocks.0.resnets.0.conv2" not in layers

    # files and the tools named for them
    files = set(manifest["files"]) - {n for n in manifest["files"] if n.startswith("samples/")}
    diffusers = variant in ("lora", "dora")
    assert files == {LORA_KOHYA_FILE, LORA_FILE if diffusers else PEFT_FILE}
    expected_tools = {"lora": {"diffusers", "a1111", "comfyui", "kohya"}, "dora": {"diffusers"}, "loha": {"a1111", "comfyui"},
                      "lokr": {"comfyui"}}[variant]  # LoKr: some factors are split here, which A1111's reader cannot take
    assert set(manifest["use_with"]) == expected_tools
    meta = read_metadata(out / LORA_KOHYA_FILE)
    assert meta["ss_network_module"] == ("networks.lora" if variant == "lora" else "lycoris.kohya")
    args = json.loads(meta["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("3", "1.5") and args.get("algo") == (None if variant == "lora" else variant.replace("dora", "lora"))

    if diffusers:  # diffusers' own loader on a pipeline of the base model
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        pipe.load_lora_weights(str(out))
        with torch.no_grad():
            z, t = _inputs()
            theirs = pipe.unet(z, t, encoder_hidden_states=pipe.encode_prompt([PROMPT] * 2, "cpu", 1, False)[0]).sample
        assert torch.allclose(theirs, trained, atol=1e-6, rtol=0), (theirs - trained).abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_files_follow_comfyui_rules(variant, fresh_backbone, tiny_backbone, tmp_path):
    """The kohya / LyCORIS file, applied with ComfyUI's formulas to the base weights, gives peft's merged weights."""
    # LoKr: w1 whole; w2 (8 x 8 or 8 x 4 here) split at rank 2 and 3, whole at rank 5 (peft splits below half its side)
    attach_adapter(fresh_backbone, "lora", variant=variant, rank=2, alpha=3.0, conv_target_modules=["conv1"], conv_rank=3,
                   conv_alpha=1.5, rank_pattern={"attn2.to_k": 5}, text_encoder=variant != "dora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fresh_backbone.adapter.trainable_parameters(fresh_backbone):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    merged = _merged_weights(fresh_backbone)
    out = export_adapter(fresh_backbone, tmp_path / variant)
    tensors = load_file(str(out / LORA_KOHYA_FILE))
    base = dict(tiny_backbone.unet.named_modules())
    unet_keys = {k.split(".", 1)[0] for k in tensors if k.startswith("lora_unet_")}
    assert unet_keys == {"lora_unet_" + n.replace(".", "_") for n in merged}  # every adapted UNet layer, nothing else
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors) == (variant != "dora")
    for name, weight in merged.items():
        key = "lora_unet_" + name.replace(".", "_")
        ours = _file_weight(tensors, key, base[name].weight.detach())
        assert torch.allclose(ours, weight, atol=1e-6, rtol=1e-5), (name, (ours - weight).abs().max())
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    if variant in ("lora", "dora"):
        assert tensors[f"{k}.lora_down.weight"].shape[0] == 5 and tensors[f"{k}.alpha"] == 3.0
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (3, 32, 3, 3)
    if variant == "loha":
        assert tensors[f"{k}.hada_w1_b"].shape[0] == 5 and tensors["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b"].shape == (3, 32 * 9)
    if variant == "lokr":  # both layouts occur, and the whole-factor one carries peft's alpha / r folded in (no .alpha)
        assert {"lokr_w2_a", "lokr_w2"} <= {p.split(".", 1)[1] for p in tensors if p.startswith("lora_unet_")}
        assert f"{k}.lokr_w2" in tensors and f"{k}.alpha" not in tensors
    if variant == "dora":  # ComfyUI's own output-axis branch divides by ||W||, not ||W + dW||: not the trained weight
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        comfy = _file_weight(tensors, "lora_unet_" + name.replace(".", "_"), base[name].weight.detach(), comfyui_dora_norm=True)
        assert not torch.allclose(comfy, merged[name], atol=1e-4)


@pytest.mark.parametrize("overrides, key", [
    (["method.variant=dora", "method.train_text_encoder=true"], "method.train_text_encoder"),
    (["method.variant=loha", "method.dropout=0.1"], "method.dropout"),
    (["method.variant=dora", "method.decompose_both=true"], "method.decompose_both"),
    (["method.variant=boft"], "method.variant"),
    (["method.rank_pattern={to_k: 0}"], "method.rank_pattern"),
])
def test_refused_combinations_fail_at_config_validation(overrides, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose("personalize", ["method=lora", *overrides, f"output_dir={tmp_path}"]))
    cfg = compose("personalize", ["method=lora", f"output_dir={tmp_path}"])
    cfg.method.alpha_pattern = {"to_(k": 2.0}  # Hydra's override grammar takes no such key; a YAML file does
    with pytest.raises(ConfigError, match=r"method\.alpha_pattern': 'to_\(k' is not a regular expression"):
        validate_config(cfg)


def test_targets_that_name_nothing_fail_before_training(tmp_path, fresh_backbone):
    with pytest.raises(AdapterError, match=r"method\.rank_pattern: 'attn3\.to_k' matches no targeted layer"):
        attach_adapter(fresh_backbone, "lora", rank_pattern={"attn3.to_k": 8})
    with pytest.raises(AdapterError, match=r"method\.conv_target_modules: 'to_q' also names non-convolution layers"):
        attach_adapter(fresh_backbone, "lora", conv_target_modules=["to_q"])
    assert fresh_backbone.adapter is None
    with pytest.raises(AdapterError, match=r"method\.conv_target_modules: 'conv9'"):  # through the training entry point
        _train(tmp_path, "loha", ["method.conv_target_modules=[conv9]"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_on_the_cross_attention_alone_adapts_exports_and_reloads_only_those_layers(tmp_path, tiny_dir, tiny_backbone):
    """`method.target_modules` names the ends of module names (docs/toy_experiments.md, "LoRA on the cross-attention
    alone"): attn2's four projections, no self-attention, no convolution."""
    out = _train(tmp_path, "lora", options=["method.target_modules=[attn2.to_k,attn2.to_v,attn2.to_q,attn2.to_out.0]",
                                            "method.conv_target_modules=[]"])
    expected = {n for n, _ in tiny_backbone.unet.named_modules()
                if any(n.endswith(f".attn2.{p}") for p in ("to_k", "to_v", "to_q", "to_out.0"))}
    assert expected and all(".transformer_blocks." in n for n in expected)
    backbone, _ = _reloaded(tiny_dir, out)
    assert set(_peft_layers(backbone.unet)) == expected
    unet_keys = {k.split(".", 1)[0] for k in load_file(str(out / LORA_KOHYA_FILE)) if k.startswith("lora_unet_")}
    assert unet_keys == {"lora_unet_" + n.replace(".", "_") for n in expected}
    assert (_eps(backbone) - _eps(tiny_backbone)).abs().max() > 1e-4


def test_default_lora_is_unchanged(fresh_backbone, tiny_backbone):
    """variant=lora with no new key: peft's LoraConfig as before (no DoRA, no patterns), lora_A/B only."""
    attach_adapter(fresh_backbone, "lora", rank=4)
    config = fresh_backbone.unet.peft_config["default"]
    assert not config.use_dora and config.rank_pattern == {} and config.alpha_pattern == {}
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in fresh_backbone.adapter.named_trainable(fresh_backbone))


@pytest.mark.parametrize("variant", [pytest.param("dora", marks=pytest.mark.slow), "lokr"])
def test_steer_trains_over_a_variant_adapter(variant, tmp_path, tiny_dir):
    """DreamSteerer on a DoRA / LoKr export: every adapter tensor moves, nothing else, and the result reloads."""
    from dreamsteer.data.samples import write_sample_images
    from dreamsteer.train.steer import run as steer

    parent = load_backbone(str(tiny_dir))
    attach_adapter(parent, "lora", variant=variant, rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in parent.adapter.trainable_parameters(parent):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    before = {n: p.detach().clone() for n, p in parent.adapter.named_trainable(parent)}
    adapter = export_adapter(parent, tmp_path / "parent", {"instance_prompt": PROMPT})
    write_sample_images(tmp_path / "photos", ["cat"])
    steered = steer(compose("steer", [
        f"adapter={adapter}", f"image={tmp_path / 'photos' / 'cat.png'}", "source_prompt='a photo of a cat next to a mirror'",
        "ref_prompt='a photo of a sks cat next to a mirror'", f"output_dir={tmp_path / 'steer'}", f"model.pretrained={tiny_dir}",
        "steps=2", "mode_shift.n_ms=1", "mode_shift.sampling_steps=2", "mode_shift.end=0.5", "mask.timesteps=[300]", "progress=false",
        "logger=none",
    ]))
    backbone, manifest = _reloaded(tiny_dir, steered)
    assert manifest["adapter_config"]["variant"] == variant
    after = dict(backbone.adapter.named_trainable(backbone))
    assert after.keys() == before.keys()
    assert all(not torch.equal(after[n], before[n]) for n in before)


def test_sample_and_edit_use_a_loha_adapter_and_merge_refuses_it(tmp_path, tiny_dir):
    import numpy as np
    from PIL import Image

    from dreamsteer.checkpoints.lora_files import LoraFileError, read_lora
    from dreamsteer.data.samples import write_sample_images
    from dreamsteer.train.edit import run as edit
    from dreamsteer.train.sample import run as sample

    backbone = load_backbone(str(tiny_dir))
    attach_adapter(backbone, "lora", variant="loha", rank=2, conv_target_modules=["conv1"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backbone.adapter.trainable_parameters(backbone):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    adapter = export_adapter(backbone, tmp_path / "loha", {"instance_prompt": PROMPT})

    common = [f"prompt='{PROMPT}'", "num_images=1", "steps=2", "logger=none", f"model.pretrained={tiny_dir}"]
    with_adapter = sample(compose("sample", [*common, f"adapter={adapter}", f"output_dir={tmp_path / 'a'}"]))
    without = sample(compose("sample", [*common, f"output_dir={tmp_path / 'b'}"]))
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (with_adapter, without))
    assert np.abs(a - b).max() > 0

    write_sample_images(tmp_path / "photos", ["cat"])
    record = edit(compose("edit", [
        f"image={tmp_path / 'photos' / 'cat.png'}", "source_prompt='a photo of a cat'", "target_prompt='a photo of a sks cat'",
        "editor=dds_sm", f"adapter={adapter}", "editor.steps=2", f"output_dir={tmp_path / 'edit'}", "progress=false",
        f"model.pretrained={tiny_dir}",
    ]))
    assert record["adapter_method"] == "lora" and record["trace"]["unet_calls"] == 2 * 2

    names = {n for n, _ in backbone.unet.named_modules()}
    with pytest.raises(LoraFileError, match="a loha adapter; merge and convert read plain LoRAs"):
        read_lora(adapter, names, set())


def test_lokr_with_whole_factors_is_named_for_a1111(fresh_backbone, tmp_path):
    attach_adapter(fresh_backbone, "lora", variant="lokr", rank=100000, conv_target_modules=["conv1"])  # rank >= half of every side
    out = export_adapter(fresh_backbone, tmp_path / "lokr")
    tensors = load_file(str(out / LORA_KOHYA_FILE))
    assert not any(k.endswith(("_a", "_b", ".alpha")) for k in tensors)  # lokr_w1 / lokr_w2 only, scale 1
    assert set(json.loads((out / "adapter.json").read_text())["use_with"]) == {"a1111", "comfyui"}


def test_a_checkpoint_from_before_the_variant_keys_resumes_as_plain_lora(tmp_path):
    from omegaconf import OmegaConf

    from dreamsteer.train.personalize import resume_changes, schema_defaults

    new_keys = ("variant", "conv_target_modules", "conv_rank", "conv_alpha", "rank_pattern", "alpha_pattern", "decompose_both", "decompose_factor")
    cfg = OmegaConf.to_container(validate_config(compose("personalize", ["method=lora", f"output_dir={tmp_path}"])), resolve=True)
    old = {**cfg, "method": {k: v for k, v in cfg["method"].items() if k not in new_keys}}  # as such a checkpoint recorded it
    assert resume_changes(old, cfg, tmp_path, schema_defaults("lora")) == {}
    dora = {**cfg, "method": {**cfg["method"], "variant": "dora"}}
    with pytest.raises(ConfigError, match=r"'method\.variant': the checkpoint .* was trained with 'lora', this run asks for 'dora'"):
        resume_changes(old, dora, tmp_path, schema_defaults("lora"))
