"""The shipped `toy` model: an ordinary diffusers folder of fp16 safetensors, loaded like any checkpoint."""
import json

import torch
from safetensors import safe_open

from dreamsteer.data.scenes import GRAMMAR_WORDS, RESOLUTION, SUBJECT
from dreamsteer.diffusion.backbone import load_backbone, resolve_model_source
from dreamsteer.diffusion.toy import BUILTIN_DIR

MAX_SHIPPED_BYTES = 25 * 2**20


def test_toy_is_a_small_fp16_diffusers_folder():
    folder = BUILTIN_DIR / "toy"
    assert resolve_model_source("toy") == str(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    weights = sorted(folder.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, path
    assert sum(p.stat().st_size for p in BUILTIN_DIR.rglob("*") if p.is_file()) <= MAX_SHIPPED_BYTES


def test_toy_loads_in_fp32_at_the_world_resolution_with_the_grammar_as_tokens():
    backbone = load_backbone("toy")
    assert backbone.dtype == torch.float32 and backbone.text_encoder.dtype == torch.float32
    assert backbone.resolution == RESOLUTION
    for word in (*GRAMMAR_WORDS, SUBJECT.token):
        assert len(backbone.tokenizer(word).input_ids) == 3, word  # start, the word, end
    z = torch.randn(1, 4, RESOLUTION // 2, RESOLUTION // 2)
    eps = backbone.predict_eps(z, torch.tensor([500]), backbone.encode_prompt(["a red circle on a white background"]))
    assert eps.shape == z.shape and torch.isfinite(eps).all()


def _attention_widths(unet) -> set[tuple[int, int]]:
    from diffusers.models.attention_processor import Attention

    return {(m.heads, m.to_q.out_features // m.heads) for m in unet.modules() if isinstance(m, Attention)}


def test_attention_heads_sets_the_number_of_heads_not_their_width():
    # diffusers' UNet config key `attention_head_dim` is read as the number of heads: a "head dim" of 32 gives 32
    # heads of 2 channels at width 64 (the ten-phase toy's), which `attention_heads` says; the default is the shipped 2.
    from dreamsteer.diffusion.toy import ToyArchitecture, build_unet

    assert _attention_widths(load_backbone("toy").unet) == {(2, 32)}
    assert _attention_widths(build_unet(ToyArchitecture(), 16, 128, seed=0)) == {(2, 32)}
    assert _attention_widths(build_unet(ToyArchitecture(attention_heads=32), 16, 128, seed=0)) == {(32, 2)}
    assert _attention_widths(build_unet(ToyArchitecture(attention_heads=2, plain_blocks=0), 16, 128, seed=0)) == {(2, 16), (2, 32)}
