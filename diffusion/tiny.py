"""The built-in tiny Stable-Diffusion-shaped model, built offline from a seed.

It mirrors SD 1.x's structure at a fraction of the size so every code path (layer selection
by relative resolution, adapters, exports, diffusers' loaders) is exercised for real on a CPU:

- UNet: cross-attention down blocks at latent, latent/2, latent/4, a plain block at latent/8,
  mirrored up blocks (plain at latent/8, cross-attention at latent/4, latent/2, latent).
- VAE: 4 blocks, so the latent is image/8 with 4 channels, as in SD.
- Text encoder: a 2-layer CLIP text model; tokenizer: a CLIP BPE tokenizer whose vocabulary is
  the 256 byte characters plus a list of whole English words, written to disk (no download).

The tiny SDXL model (`build_tiny_sdxl_pipeline`, ``load_backbone("tiny-sdxl")``) mirrors SDXL the same way:

- UNet: SDXL's layout at tiny widths: a plain down block at the latent size, cross-attention blocks at
  latent/2 and latent/4 with 1 and 2 transformer layers (SDXL: 2 and 10), two layers per block, linear
  projections, ``text_time`` added conditions (pooled text embedding + 6 size/crop ids);
- text encoders: a CLIPTextModel (width 32) and a CLIPTextModelWithProjection (width 64, projection 64)
  on the same offline tokenizer (the second pads with "!", as SDXL's ``tokenizer_2``); cross-attention
  width 32 + 64 = 96 (their penultimate hidden states concatenated);
- VAE: as the tiny model's, with SDXL's scaling factor 0.13025; scheduler: SDXL's Euler discrete one.

Each model is saved once as a diffusers pipeline folder and then loaded through the same path
as any real checkpoint (`diffusion.backbone.load_backbone`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

TINY_RESOLUTION = 128
TINY_VERSION = 1  # bump when the architecture below changes, so stale caches are rebuilt
TINY_SDXL_VERSION = 1

# Whole-word tokens, so class nouns ("cat", "dog") are one token each as in SD's vocabulary.
BASE_WORDS = """
a an the of in on at with and or to from by for next near under over behind front top side
photo picture image painting drawing sketch render close up shot portrait style art digital
cat cats dog dogs puppy kitten person man woman boy girl child face people astronaut rocket
cup coffee mug teapot bowl vase flower flowers rose tree trees grass field mountain mountains
beach sea ocean river lake sky cloud clouds sun moon snow rain city street road house building
room table chair sofa bed window mirror door wall floor car bike bicycle boat train plane
hat glasses sunglasses scarf shirt jacket crown bow tie necklace backpack toy ball box bag
red green blue yellow black white brown orange pink purple gray grey golden silver wooden
small big large tiny cute old young happy sitting standing lying running jumping wearing
holding looking eating sleeping playing is are its his her their my your this that
sks zwx ohwx xyz cinematic watercolor oil lego low poly illustration high quality detailed
background foreground left right center middle day night sunset forest garden park desert
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable unicode table (every byte maps to a visible character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tiny_tokenizer_files(directory: Path, words: Sequence[str] = tuple(BASE_WORDS)) -> None:
    """Write vocab.json and merges.txt of a small CLIP BPE tokenizer.

    The vocabulary holds every byte character (alone and word-final), the merges that build each
    of `words` (default: `BASE_WORDS`) left to right, and the start/end tokens, in CLIP's layout.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in dict.fromkeys(words):  # dedupe, keep order
        # Segment the word with the merges so far (lowest rank first, as BPE does), then add the
        # merges joining what is left, left to right. New merges rank after all earlier ones, so
        # they never change how an earlier word is segmented: every word becomes one token.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == len(ranks):
                pair = (symbols[0], symbols[1])
                i = 0
                ranks[pair] = len(merges)
                merges.append(pair)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            if symbols[i] not in known:
                vocab.append(symbols[i])
                known.add(symbols[i])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_tokenizer(**kwargs: Any):
    """The offline CLIP BPE tokenizer of the tiny models (77 tokens; `kwargs` go to `from_pretrained`)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, **kwargs)


def _tiny_vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _text_config(tokenizer: Any, width: int, layers: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
    )


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny StableDiffusionPipeline with weights drawn from `seed` (deterministic)."""
    from diffusers import UNet2DConditionModel

    from dreamsteer.diffusion.toy import make_pipeline, toy_scheduler  # one scheduler and pipeline assembly for both
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = _tiny_vae(seed + 1, scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, width=64, layers=2, projection_dim=64))
    return make_pipeline(vae, text_encoder, tokenizer, unet, toy_scheduler())


def build_tiny_sdxl_pipeline(seed: int = 0):
    """Build the tiny StableDiffusionXLPipeline with weights drawn from `seed` (deterministic)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer(pad_token="!")
    width_1, width_2, pooled, time_dim = 32, 64, 64, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=width_1 + width_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
        norm_num_groups=16,
    )
    vae = _tiny_vae(seed + 1, scaling_factor=0.13025)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, width=width_1, layers=2, projection_dim=width_1))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, width=width_2, layers=2, projection_dim=pooled))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)


def default_cache_dir() -> Path:
    """Where built tiny models live: $DREAMSTEER_CACHE, else ~/.cache/dreamsteer."""
    return Path(os.environ.get("DREAMSTEER_CACHE", Path.home() / ".cache" / "dreamsteer"))


def tiny_model_dir(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the diffusers folder of the tiny model for `seed`, building it once if missing."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"tiny-v{TINY_VERSION}-seed{seed}", lambda: build_tiny_pipeline(seed))


def tiny_sdxl_model_dir(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the diffusers folder of the tiny SDXL model for `seed`, building it once if missing."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"tiny-sdxl-v{TINY_SDXL_VERSION}-seed{seed}", lambda: build_tiny_sdxl_pipeline(seed))


def build_once(target: Path, build: Callable[[], Any]) -> Path:
    """Save the pipeline `build()` returns as the diffusers folder `target`, unless it exists.

    The folder is written to a temp dir and renamed into place, so a crash never leaves a
    half-written model that later runs would load.
    """
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
