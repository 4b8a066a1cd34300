"""The built-in tiny Stable-Diffusion-shaped model, built offline from a seed.

It mirrors SD 1.x's structure at a fraction of the size so every code path (layer selection
by relative resolution, adapters, exports, diffusers' loaders) is exercised for real on a CPU:

- UNet: cross-attention down blocks at latent, latent/2, latent/4, a plain block at latent/8,
  mirrored up blocks (plain at latent/8, cross-attention at latent/4, latent/2, latent).
- VAE: 4 blocks, so the latent is image/8 with 4 channels, as in SD.
- Text encoder: a 2-layer CLIP text model; tokenizer: a CLIP BPE tokenizer whose vocabulary is
  the 256 byte characters plus a list of whole English words, written to disk (no download).

The model is saved once as a diffusers pipeline folder and then loaded through the same path
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


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny StableDiffusionPipeline with weights drawn from `seed` (deterministic)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreamsteer.diffusion.toy import make_pipeline, toy_scheduler  # one scheduler and pipeline assembly for both
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)

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
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=64,
        )
    )
    return make_pipeline(vae, text_encoder, tokenizer, unet, toy_scheduler())


def default_cache_dir() -> Path:
    """Where built tiny models live: $DREAMSTEER_CACHE, else ~/.cache/dreamsteer."""
    return Path(os.environ.get("DREAMSTEER_CACHE", Path.home() / ".cache" / "dreamsteer"))


def tiny_model_dir(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the diffusers folder of the tiny model for `seed`, building it once if missing."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"tiny-v{TINY_VERSION}-seed{seed}", lambda: build_tiny_pipeline(seed))


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
