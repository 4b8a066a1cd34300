"""Our files read by other tools' rules, re-implemented here from their published sources (not our code):

- ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip``: a kohya module
  ``lora_unet_<diffusers UNet key without .weight, '.' -> '_'>`` or
  ``lora_te_text_model_encoder_layers_<b>_<self_attn_{q,k,v,out}_proj|mlp_fc1|mlp_fc2>`` patches that weight
  (``clip_l`` for SD 1.x, ``clip_h`` for SD 2.x, both in Hugging Face CLIP names);
- A1111 ``extensions-builtin/Lora/lora_convert.py`` ``convert_diffusers_name_to_compvis``: kohya names
  -> the CompVis module names of the loaded checkpoint (``diffusion_model_input_blocks_{1+3i+j}_{0|1}_...``,
  resnet sub-names ``in_layers_2`` ..., SD 2.x text encoder ``model_transformer_resblocks_<b>_attn``
  with q/k/v falling back to the ``attn`` module (``re_x_proj``));
- embeddings: a safetensors file of one ``[n, dim]`` tensor; A1111 names the trigger word after the
  file, ComfyUI takes the file's first tensor (``embedding:<name>``).

Run on SD-1.5- and SD-2.1-shaped models built on the meta device (real layer counts and widths,
no memory), on the tiny model, and on the DreamBooth single file through ``from_single_file``.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from dreamsteer.checkpoints import export_adapter, kohya
from dreamsteer.checkpoints.formats import LORA_KOHYA_FILE, SINGLE_FILE
from dreamsteer.checkpoints.sd_single_file import pipeline_to_original
from dreamsteer.diffusion.adapters import TEXT_LORA_TARGETS, UNET_LORA_TARGETS, attach_adapter

_UNET_COMMON = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, in_channels=4, out_channels=4,
)
_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
SHAPES = {
    "sd15": (dict(_UNET_COMMON, cross_attention_dim=768, attention_head_dim=8),
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")),
    "sd21": (dict(_UNET_COMMON, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
             dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")),
}
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj"}


def _meta_models(shape: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg = SHAPES[shape]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text_cfg))
    return unet, vae, text


def _kohya_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """kohya module name -> (lora_up shape, lora_down shape)."""
    names = {k.split(".", 1)[0] for k in state}
    return {n: (state[f"{n}.lora_up.weight"].shape, state[f"{n}.lora_down.weight"].shape) for n in names}


def _text_weights(text_encoder) -> dict[str, torch.Size]:
    """Hugging Face CLIP weight names with the text_model. prefix, as ComfyUI's clip models name them."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v.shape for k, v in text_encoder.state_dict().items()}


# ----------------------------------------------------------------------------- ComfyUI's rule
def comfyui_key_map(unet_weights: dict[str, torch.Size], text_weights: dict[str, torch.Size]) -> dict[str, torch.Size]:
    key_map = {}
    for key, shape in unet_weights.items():
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = shape
    for b in range(32):
        for c, name in COMFY_CLIP_MAP.items():
            key = f"text_model.encoder.layers.{b}.{c}.weight"
            if key in text_weights:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{name}"] = text_weights[key]
    return key_map


# ----------------------------------------------------------------------------- A1111's rule
_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    def suffix(kind: str, rest: str) -> str:
        return _RESNET.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def a1111_finds(kohya_name: str, modules: set[str], is_sd2: bool) -> bool:
    name = a1111_compvis_name(kohya_name, is_sd2)
    if name in modules:
        return True
    m = re.match(r"(.*)_([qkv]_proj)$", name)  # SD 2.x: q/k/v live in the attention's in_proj
    return bool(m) and m[1] in modules


def a1111_modules(original: dict[str, torch.Tensor]) -> set[str]:
    """CompVis module names as A1111 registers them (``sd_model.model`` and ``cond_stage_model.wrapped``)."""
    out = set()
    for key in original:
        module = key.rsplit(".", 1)[0]
        for prefix in ("model.", "cond_stage_model."):
            if module.startswith(prefix):
                out.add(module[len(prefix):].replace(".", "_"))
    return out


@pytest.mark.parametrize("shape", ["sd15", "sd21"])
def test_kohya_keys_map_in_comfyui_and_a1111_on_real_shapes(shape):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, vae, text = _meta_models(shape)
    unet_weights, text_weights = {k: v.shape for k, v in unet.state_dict().items()}, _text_weights(text)
    original = pipeline_to_original(unet, vae, text, kohya.is_sd2(text.config))
    with torch.device("meta"):
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_LORA_TARGETS)))
        text.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(TEXT_LORA_TARGETS)))
        state = kohya.peft_to_kohya(get_peft_model_state_dict(unet), kohya.UNET_PREFIX, 4.0, text_encoder=False)
        state.update(kohya.peft_to_kohya(get_peft_model_state_dict(text), kohya.TEXT_PREFIX, 4.0, text_encoder=True))
    modules = _kohya_modules(state)
    n_text = SHAPES[shape][1]["num_hidden_layers"] * 4
    assert len(modules) == 16 * 2 * 4 + n_text  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out) + 4 per text layer

    comfy = comfyui_key_map(unet_weights, text_weights)
    unmapped = [n for n in modules if n not in comfy]
    assert not unmapped, unmapped[:5]
    for name, (up, down) in modules.items():
        assert (up[0], down[1]) == tuple(comfy[name][:2]), name  # up @ down has the patched weight's shape

    is_sd2 = shape == "sd21"
    a1111 = a1111_modules(original)
    missed = [n for n in modules if not a1111_finds(n, a1111, is_sd2)]
    assert not missed, missed[:5]


@pytest.mark.parametrize("shape", ["sd15", "sd21"])
def test_single_file_layout_is_what_diffusers_converts_back(shape):
    """Our original-layout names on real SD shapes, read back by diffusers' own LDM converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint

    unet, vae, text = _meta_models(shape)
    original = pipeline_to_original(unet, vae, text, kohya.is_sd2(text.config))
    assert set(convert_ldm_unet_checkpoint(original, unet.config)) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(original, vae.config)) == set(vae.state_dict())
    if shape == "sd21":
        back = convert_open_clip_checkpoint(text, original)
        assert {k.removeprefix("text_model.") for k in back} == set(text.state_dict()) - {"embeddings.position_ids"}
        q = original["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert q.shape == (3 * 1024, 1024)
    else:
        assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in original


def test_tiny_export_files_register_in_comfyui(fresh_backbone, tiny_backbone, tmp_path):
    attach_adapter(fresh_backbone, "lora", rank=4, text_encoder=True)
    out = export_adapter(fresh_backbone, tmp_path / "lora")
    modules = _kohya_modules(load_file(str(out / LORA_KOHYA_FILE)))
    comfy = comfyui_key_map({k: v.shape for k, v in tiny_backbone.unet.state_dict().items()}, _text_weights(tiny_backbone.text_encoder))
    assert len(modules) == 10 * 2 * 4 + 2 * 4  # tiny UNet: 10 transformer blocks x (attn1, attn2) x 4; 2 text layers x 4
    assert all(n in comfy and (up[0], down[1]) == tuple(comfy[n][:2]) for n, (up, down) in modules.items())


def test_textual_inversion_files_follow_the_embedding_conventions(fresh_backbone, tmp_path):
    attach_adapter(fresh_backbone, "textual_inversion", tokens=["<sks>", "<zwx-style>"], num_vectors=2)
    out = export_adapter(fresh_backbone, tmp_path / "ti")
    manifest = json.loads((out / "adapter.json").read_text())
    dim = fresh_backbone.text_encoder.config.hidden_size
    vectors = fresh_backbone.adapter.vectors(fresh_backbone)
    for tool in ("a1111", "comfyui"):
        names = manifest["use_with"][tool]
        assert sorted(n.rsplit("/", 1)[-1].rsplit(".", 1)[0] for n in names) == ["sks", "zwx-style"]  # the trigger words
    for name in manifest["use_with"]["a1111"]:
        state = load_file(str(out / name))
        (value,) = state.values()  # one tensor: A1111 takes it as the embedding, ComfyUI its first value
        token = "<" + name.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ">"
        assert value.shape == (2, dim) and torch.equal(value, vectors[token].float())


def test_dreambooth_single_file_round_trips_through_from_single_file(fresh_backbone, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    attach_adapter(fresh_backbone, "dreambooth", train_text_encoder=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fresh_backbone.adapter.trainable_parameters(fresh_backbone):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = export_adapter(fresh_backbone, tmp_path / "db")
    pipe = StableDiffusionPipeline.from_single_file(str(out / SINGLE_FILE), config=str(tiny_dir), local_files_only=True)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        emb = fresh_backbone.encode_prompt(["a photo of sks cat"] * 2)
        ours = fresh_backbone.unet(z, t, encoder_hidden_states=emb).sample
        theirs_emb = pipe.encode_prompt(["a photo of sks cat"] * 2, "cpu", 1, False)[0]
        theirs = pipe.unet(z, t, encoder_hidden_states=theirs_emb).sample
    assert torch.equal(theirs_emb, emb) and torch.equal(theirs, ours)
    for name in ("vae",):
        mine, loaded = getattr(fresh_backbone, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in mine.items())
