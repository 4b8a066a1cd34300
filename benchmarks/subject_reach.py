"""Can a toy-world model's text conditioning reach the personal subject at all? A probe of what Textual
Inversion can reach, with no sampling tricks and no method code in between.

Textual Inversion changes one thing, the input embedding of a new word; the UNet sees the text encoder's
output. This probe frees `k` vectors at the positions of some words of a subject prompt and fits them to
the subject photos with the epsilon loss, everything else frozen,

    v* = argmin_v  E_{x, t, eps} | eps_theta(z_t, t, c(v)) - eps |^2,   z = E(x) (latent mean), t ~ U[0, T),

in one of two spaces:

- ``input``: the text encoder's input embeddings at those positions (what Textual Inversion learns, one
  vector per word);
- ``output``: the text encoder's hidden states at those positions (what any input could give the UNet
  there, past the text encoder).

Then it samples `per_background` images per background color from the fitted conditioning (the floors'
sampler: DDIM 25 steps, guidance 7.5, the empty prompt as negative) and counts those where the detector
finds the subject. The ``output`` space bounds what the freed words themselves can say; it holds fixed the
hidden states of the words after them, which a Textual Inversion word also moves (the text encoder is
causal), so it is a strong hint about Textual Inversion's reach, not a proof.

    python -m dreamsteer.benchmarks.subject_reach --model toy --space output --phrase "sks circle" --learn sks
    python -m dreamsteer.benchmarks.subject_reach --model runs/m/model --space input \
        --phrase "blue circle with a yellow center"     # every word of the description free

Development seeds only (`--seed`, default 424242): photos ``(seed, i)``, samples ``seed + i``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dreamsteer.benchmarks.toy_floors import sampling_pipeline
from dreamsteer.data.files import write_json_atomic
from dreamsteer.data.images import pil_to_tensor, save_image_grid
from dreamsteer.data.scenes import BACKGROUND_COLORS, subject_scene
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.diffusion.toy import words_not_single_tokens
from dreamsteer.distill.edsd import denoising_loss
from dreamsteer.metrics.detector import detect

SPACES = ("input", "output")
DEV_SEED = 424242


def subject_prompt(phrase: str, background: str) -> str:
    """The floors' subject prompt with `phrase` naming the subject."""
    return f"a {phrase} on a {background} background"


def learned_positions(tokenizer: Any, phrase: str, learn: Sequence[str]) -> list[int]:
    """Token positions (BOS = 0) in `subject_prompt(phrase, ...)` of the words of `phrase` that are in
    `learn`; every word must be one token and every word of `learn` in `phrase`."""
    words = phrase.split()
    missing = [w for w in learn if w not in words]
    if missing:
        raise ValueError(f"--learn: {missing} not in the phrase {phrase!r}")
    split = words_not_single_tokens(tokenizer, words)
    if split:
        raise ValueError(f"--phrase: {split} are not single tokens of the model's tokenizer")
    return [2 + i for i, w in enumerate(words) if w in learn]  # BOS, "a", then the phrase


def conditioning(backbone: Any, space: str, positions: Sequence[int], vectors: torch.Tensor, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """() -> the text encoder's hidden states of `ids` [B, L] with `vectors` [k, D] at `positions`, in `space`
    (called again after each change of `vectors`; the output space encodes `ids` once)."""
    if space not in SPACES:
        raise ValueError(f"space {space!r}: expected one of {SPACES}")
    encoder = backbone.text_encoder
    index = list(positions)

    def swap(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, index] = vectors.to(output.dtype)
        return output

    if space == "output":
        with torch.no_grad():
            hidden = encoder(ids)[0]
        return lambda: swap(None, None, hidden)

    def encode() -> torch.Tensor:
        hook = encoder.get_input_embeddings().register_forward_hook(swap)
        try:
            return encoder(ids)[0]
        finally:
            hook.remove()

    return encode


def initial_vectors(backbone: Any, space: str, ids: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """The prompt's own vectors at `positions` in `space` (the fit starts from the words it replaces)."""
    with torch.no_grad():
        if space == "input":
            return backbone.text_encoder.get_input_embeddings()(ids[:1])[0, list(positions)].float().clone()
        return backbone.text_encoder(ids[:1])[0][0, list(positions)].float().clone()


def subject_latents(backbone: Any, photos: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The latent means of the subject photos ``(seed, i)`` and their backgrounds."""
    scenes = [subject_scene((seed, i), resolution=backbone.resolution) for i in range(photos)]
    pixels = torch.stack([pil_to_tensor(s.image) for s in scenes])
    with torch.no_grad():
        latents = backbone.encode_image(pixels.to(backbone.device, backbone.dtype))
    return latents, [s.background for s in scenes]


def fit(backbone: Any, condition: Callable[[], torch.Tensor], vectors: torch.Tensor, latents: torch.Tensor,
        steps: int, lr: float, seed: int, progress: bool = True) -> list[float]:
    """Adam on `vectors` (a leaf tensor with grad) against the epsilon loss of `latents` under `condition`'s
    hidden states (one row per latent); the loss of every step."""
    optimizer = torch.optim.Adam([vectors], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="fit", disable=not progress):
        eps = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, backbone.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
        loss = denoising_loss(backbone.predict_eps(backbone.add_noise(latents, eps, t), t, condition()), eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def subject_rates(backbone: Any, space: str, positions: Sequence[int], vectors: torch.Tensor, phrase: str, per_background: int,
                  seed: int, steps: int = 25, guidance: float = 7.5) -> tuple[dict[str, int], list[Any]]:
    """Samples with the subject per background, and the images (background by background)."""
    pipe = sampling_pipeline(backbone)
    counts, images = {}, []
    with torch.no_grad():
        uncond = backbone.encode_prompt([""])
        for background in BACKGROUND_COLORS:
            cond = conditioning(backbone, space, positions, vectors, backbone.tokenize([subject_prompt(phrase, background)]))().detach()
            generators = [torch.Generator().manual_seed(seed + i) for i in range(per_background)]
            kwargs = backbone.pipeline_prompt_kwargs(cond.repeat(per_background, 1, 1), uncond.repeat(per_background, 1, 1))
            batch = pipe(**kwargs, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
            counts[background] = sum(detect(image).has_subject for image in batch)
            images += batch
    return counts, images


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="a toy-world model: built-in name or folder")
    parser.add_argument("--space", choices=SPACES, default="output")
    parser.add_argument("--phrase", default="sks circle", help="the words naming the subject in the prompt")
    parser.add_argument("--learn", nargs="*", default=None, help="the phrase's words whose vectors are fitted (default: all; none: the base)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--per-background", type=int, default=10)
    parser.add_argument("--seed", type=int, default=DEV_SEED)
    parser.add_argument("--out", type=Path, default=Path("outputs/subject_reach"))
    args = parser.parse_args(argv)

    backbone = load_backbone(args.model).freeze()
    learn = args.phrase.split() if args.learn is None else args.learn
    positions = learned_positions(backbone.tokenizer, args.phrase, learn)
    latents, backgrounds = subject_latents(backbone, args.photos, args.seed)
    ids = backbone.tokenize([subject_prompt(args.phrase, b) for b in backgrounds])
    vectors = initial_vectors(backbone, args.space, ids, positions).requires_grad_(True)
    condition = conditioning(backbone, args.space, positions, vectors, ids.repeat(2, 1))  # two noise draws per photo a step
    started = time.perf_counter()
    losses = fit(backbone, condition, vectors, latents.repeat(2, 1, 1, 1), args.steps if positions else 0, args.lr, args.seed)
    counts, images = subject_rates(backbone, args.space, positions, vectors, args.phrase, args.per_background, args.seed)
    result = {"model": args.model, "space": args.space, "phrase": args.phrase, "learn": learn, "steps": args.steps, "lr": args.lr,
              "seed": args.seed, "subject": sum(counts.values()), "samples": args.per_background * len(BACKGROUND_COLORS),
              "by_background": counts, "loss_first_100": float(np.mean(losses[:100])) if losses else None,
              "loss_last_100": float(np.mean(losses[-100:])) if losses else None, "seconds": round(time.perf_counter() - started, 1)}
    name = f"{args.space}_{'-'.join(learn) or 'none'}"
    args.out.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, args.out / f"{name}.png", columns=args.per_background)
    write_json_atomic(result, args.out / f"{name}.json")
    print(f"{args.model}: {args.space} space, {learn or 'nothing'} free in {subject_prompt(args.phrase, '<bg>')!r}: subject in "
          f"{result['subject']} of {result['samples']} ({counts}); loss {result['loss_first_100']} -> {result['loss_last_100']}")
    return result


if __name__ == "__main__":
    main()
