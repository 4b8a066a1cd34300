"""The toy model: a Stable-Diffusion-shaped model trained here on the toy world (`data.scenes`).

It is made only of the usual classes, so every loader and method treats it as a real checkpoint:

- VAE: diffusers `AutoencoderKL` with 2 blocks (latent = image / 2, 4 channels);
- UNet: `UNet2DConditionModel`, a plain block at the latent size and cross-attention blocks at
  latent/2 and latent/4 (mirrored on the way up; `plain_blocks=0` puts cross-attention at every size);
- text encoder: a small transformers `CLIPTextModel`; tokenizer: the project's offline CLIP BPE
  tokenizer (`diffusion.tiny`) with the toy grammar's words added, each one token;
- scheduler: SD 1.x's DDPM noise schedule (scaled-linear betas, epsilon prediction).

`train pretrain` trains it (`lit_modules.pretrain`); the shipped weights live in
`diffusion/builtin/toy/` as an ordinary diffusers folder (fp16 safetensors) and load with
`load_backbone("toy")`. `diffusion/builtin/toy-gligen/` is a GLIGEN model of the same world
(`StableDiffusionGLIGENPipeline`: gated self-attention layers that place a phrase's object in its box),
loaded with `load_backbone("toy-gligen")`; docs/toy.md has the recipes of both.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_MODELS = ("toy", "toy-gligen")


@dataclass(frozen=True)
class ToyArchitecture:
    """Sizes of the toy model's components (the defaults are the shipped model's)."""

    resolution: int = 32
    vae_channels: tuple[int, ...] = (32, 64)  # 2 blocks: latent = resolution / 2
    unet_channels: tuple[int, ...] = (32, 64, 64)  # plain block, then cross-attention blocks
    plain_blocks: int = 1  # leading UNet blocks without cross-attention (0: attention at the latent size too)
    layers_per_block: int = 1
    # Heads of every UNet attention layer. diffusers' UNet config calls this `attention_head_dim` (a naming
    # slip kept for compatibility, diffusers issue #2011). 2 heads are 32 channels wide at the 64-channel blocks.
    attention_heads: int = 2
    text_width: int = 128
    text_layers: int = 2
    max_tokens: int = 24  # the longest grammar caption (3 objects) is 17 tokens with start/end


def toy_tokenizer(words: Sequence[str], max_tokens: int):
    """The offline CLIP BPE tokenizer with the tiny model's words plus `words`, each one token."""
    from transformers import CLIPTokenizer

    from dreamsteer.diffusion.tiny import BASE_WORDS, write_tiny_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer_files(Path(tmp), list(BASE_WORDS) + list(words))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_tokens)


def words_not_single_tokens(tokenizer, words: Sequence[str]) -> list[str]:
    """The `words` the tokenizer splits into several pieces (a model can only have learned whole-token words)."""
    return [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]


def build_vae(arch: ToyArchitecture, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=arch.resolution,
        scaling_factor=1.0,  # set from the latents' spread once the VAE is trained
    )


def build_text_encoder(arch: ToyArchitecture, tokenizer: Any, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_width,
            intermediate_size=2 * arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=max(1, arch.text_width // 32),
            max_position_embeddings=arch.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=arch.text_width,
        )
    )


def build_unet(arch: ToyArchitecture, latent_size: int, cross_attention_dim: int, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n, plain = len(arch.unet_channels), arch.plain_blocks
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (n - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (n - plain) + ("UpBlock2D",) * plain,
        block_out_channels=tuple(arch.unet_channels),
        layers_per_block=arch.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=arch.attention_heads,  # read by diffusers as the number of heads
        norm_num_groups=16,
    )


def toy_scheduler():
    """SD 1.x's training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def make_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any):
    """The components as a diffusers pipeline (a GLIGEN pipeline when the UNet has gated layers)."""
    from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionPipeline

    gated = getattr(unet.config, "attention_type", "default") == "gated"
    cls = StableDiffusionGLIGENPipeline if gated else StableDiffusionPipeline
    return cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pretrained_atomic(obj: Any, target: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save a diffusers pipeline or model as the folder `target` (safetensors, weights in `dtype`),
    replacing any folder there only once the new one is complete (temp dir, then rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    old = target.with_name(target.name + ".old")
    try:
        copied = copy.deepcopy(obj)
        if copied.dtype != dtype:
            copied.to(dtype)
        copied.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def builtin_model_dir(name: str) -> Path:
    """The shipped folder of a built-in trained model (``toy``, ``toy-gligen``)."""
    from dreamsteer.diffusion.backbone import ModelLoadError

    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}: expected one of {BUILTIN_MODELS}")
    path = BUILTIN_DIR / name
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"built-in model {name!r}: its weights are missing from {path} (a broken install?)")
    return path
