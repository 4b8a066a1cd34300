"""Why a GLIGEN model of the toy world does or does not put objects in their boxes: checks that take
seconds and need no sampling.

- **Box use.** The noise error ``mean (eps_theta(z_t, t, c, g) - eps)^2`` on held-out scenes at fixed
  noise levels, the same ``z_t`` and ``eps`` for three kinds of grounding tokens ``g``: each scene's
  phrases with their true boxes, the same phrases with the boxes mirrored left-right, and none
  (masks 0: GLIGEN's null tokens). A model that uses its boxes has a lower error with the true boxes
  than with the mirrored ones; one that uses only the phrases has true = mirrored < none. And the
  **box reach**: how far the predicted noise itself moves when the boxes are mirrored, and when the
  grounding tokens are dropped, relative to its size: the strength of the path by which the boxes (and
  any gradient that would teach their use) reach the output.
- **Layout reward.** What the epsilon loss at high noise pays for not knowing where the objects are: the
  model's noise error at t = 950, 900, 800 against the error it would have if its clean-latent estimate
  were as good as its own estimate at t = 600, where the noisy latent shows the layout
  (``a_t / (1 - a_t) |x0_hat_600 - z|^2``). The gap is what a model that read its boxes could gain there.
- **Position code.** GLIGEN's gated self-attention gives its visual tokens no position embedding:
  a token can only tell whether it lies inside a box from what the UNet's features say about where it
  is. A ridge regression from the features entering each transformer block to the token's grid
  coordinates (x, y), fitted on the centre tokens (the middle half of the grid in both directions) of
  some scenes and scored on those of others, by its mean absolute error against the error of always
  predicting their mean coordinate. At chance, the features do not say where a centre token is (the
  border tokens see the zero padding of the convolutions; they are left out of fit and score alike).
- **Grounding attention.** Per gated layer (``x + tanh(alpha_attn) * attn([x, objs])[:n_visual]``):
  its gate ``tanh(alpha_attn)``; the share of the visual tokens' attention that goes to the real
  objects' grounding tokens, against the share they would get if the attention paid to all 30 grounding
  slots were spread evenly (the other slots hold GLIGEN's null token); and the size of the gated output
  against the size of ``x``. A layer that reads its objects gives them more than the even share.
  And whether that attention follows the boxes: the mean attention an object's grounding token gets
  from the visual tokens whose centres lie inside the box it was given, over the mean it gets from
  those inside that box mirrored left-right, once with the true boxes given and once with the mirrored
  ones. A layer that reads the boxes gives both ratios above 1; one that finds its object by what the
  noisy image shows gives the true boxes a ratio above 1 and the mirrored ones below 1; one that
  does neither gives about 1 to both (a bias that is the same left and right cancels).
- **Position words** (models whose tokenizer has ``data.scenes.POSITION_WORDS``, trained with
  ``data.position_words_p``): the noise error as in box use, with no grounding tokens, for captions that
  name each object's true place ("a red circle top left ..."), its place mirrored left-right, and no
  place. A model whose features say where a token is, for its cross-attention, follows the words:
  true < mirrored.

    python -m dreamsteer.benchmarks.gligen_probe --model toy                 # position code only
    python -m dreamsteer.benchmarks.gligen_probe --model runs/gligen/model   # every check
    python -m dreamsteer.benchmarks.gligen_probe --model runs/g/model --fixed-pattern 16  # trained with data.fixed_pattern=16
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Sequence

import torch

from dreamsteer.data.scenes import FIXED_PATTERN_CELL, POSITION_WORDS, Scene, make_caption, random_scene, scene_item
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.diffusion.gligen import gated_blocks, grounding_inputs, is_gligen
from dreamsteer.diffusion.toy import words_not_single_tokens

PROBE_SEED = 434343  # scenes no training run, floor or effects table uses
TIMESTEPS = (900, 750, 600, 300)
GROUNDINGS = ("true", "mirrored", "none")


def mirror_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes ``[N, 4]`` (x0, y0, x1, y1 as fractions) mirrored left-right: same sizes, other places."""
    return torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)


@torch.no_grad()
def encode_scenes(backbone: Any, scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, caption embeddings) of the scenes: encoded once, noised at each level by `_noised`."""
    pixels = torch.stack([scene_item(s)["pixel_values"] for s in scenes]).to(backbone.device, backbone.dtype)
    return backbone.encode_image(pixels), backbone.encode_prompt([s.caption for s in scenes])


def _noised(backbone: Any, z: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_t, eps, t per item) of latents `z` at noise level `t`, the noise drawn from `seed`."""
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
    t_batch = torch.full((len(z),), t, device=backbone.device)
    return backbone.add_noise(z, eps, t_batch), eps, t_batch


def scene_grounding(backbone: Any, scenes: Sequence[Scene], kind: str) -> dict[str, torch.Tensor]:
    """``cross_attention_kwargs["gligen"]`` for the scenes: their phrases with the `kind` of boxes
    ("true", "mirrored") or no grounding at all ("none": the null tokens GLIGEN's unconditional half gets)."""
    if kind not in GROUNDINGS:
        raise ValueError(f"grounding kind {kind!r}: one of {GROUNDINGS}")
    parts = []
    for scene in scenes:
        boxes = scene_item(scene)["boxes"]  # fractions of the side
        if kind == "mirrored":
            boxes = mirror_boxes(boxes)
        parts.append(grounding_inputs(backbone, scene.phrases, boxes.tolist()))
    grounding = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if kind == "none":
        grounding["masks"] = torch.zeros_like(grounding["masks"])
    return grounding


def caption_only(backbone: Any, scenes: Sequence[Scene]) -> dict[str, Any] | None:
    """``cross_attention_kwargs`` of a caption-only prediction: for a GLIGEN model GLIGEN's null tokens
    (masks 0), which is how it was trained when the grounding was dropped (with no kwargs its gated layers
    would be skipped, a model it never was); for any other model none."""
    return {"gligen": scene_grounding(backbone, scenes, "none")} if is_gligen(backbone.unet) else None


Predictions = dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]]


@torch.no_grad()
def grounded_predictions(backbone: Any, scenes: Sequence[Scene], timesteps: Sequence[int] = TIMESTEPS, seed: int = 0) -> Predictions:
    """``{t: (eps, {grounding kind: predicted eps})}`` on the scenes noised at each of `timesteps` (the
    noise at the i-th drawn from ``seed + i``, the same for the three groundings): what `box_use` and
    `box_reach` read, computed once for both."""
    groundings = {kind: scene_grounding(backbone, scenes, kind) for kind in GROUNDINGS}
    z, text = encode_scenes(backbone, scenes)
    result = {}
    for i, t in enumerate(timesteps):
        z_t, eps, t_batch = _noised(backbone, z, t, seed + i)
        result[t] = (eps.float(), {kind: backbone.predict_eps(z_t, t_batch, text, cross_attention_kwargs={"gligen": g}).float()
                                   for kind, g in groundings.items()})
    return result


def box_use(predictions: Predictions) -> dict[int, dict[str, float]]:
    """``{t: {"true" | "mirrored" | "none": mean squared noise error}}`` of `grounded_predictions` (module docstring)."""
    return {t: {kind: float(((pred - eps) ** 2).mean()) for kind, pred in preds.items()} for t, (eps, preds) in predictions.items()}


def box_reach(predictions: Predictions) -> dict[int, dict[str, float]]:
    """``{t: {"mirrored" | "none": |eps_true - eps_kind| / |eps_true|}}`` of `grounded_predictions`: how far the
    predicted noise moves when the boxes are mirrored, and when the grounding tokens are dropped (norms over the batch)."""
    return {t: {kind: float((preds["true"] - preds[kind]).norm() / preds["true"].norm()) for kind in ("mirrored", "none")}
            for t, (_, preds) in predictions.items()}


@torch.no_grad()
def layout_reward(backbone: Any, scenes: Sequence[Scene], timesteps: Sequence[int] = (950, 900, 800), known_at: int = 600,
                  seed: int = 0) -> dict[int, tuple[float, float]]:
    """``{t: (the model's noise error at t, the error it would have if it knew the scene as well as it does
    at `known_at`)}``, captions only (`caption_only`). The second is ``a_t / (1 - a_t) |x0_hat - z|^2`` with
    ``x0_hat`` the model's own clean-latent estimate at `known_at`: what the epsilon loss at t pays for not
    knowing the layout (which at `known_at` the noisy latent shows), and so what a model that read the boxes
    could gain."""
    z, text = encode_scenes(backbone, scenes)
    alphas = backbone.scheduler.alphas_cumprod.to(z.device, torch.float64)
    kwargs = caption_only(backbone, scenes)

    def estimate(t: int, noise_seed: int) -> tuple[torch.Tensor, float]:
        z_t, eps, t_batch = _noised(backbone, z, t, noise_seed)
        pred = backbone.predict_eps(z_t, t_batch, text, cross_attention_kwargs=kwargs)
        a = alphas[t]
        x0 = (z_t.double() - (1 - a).sqrt() * pred.double()) / a.sqrt()
        return x0, float(((pred.float() - eps.float()) ** 2).mean())

    known, _ = estimate(known_at, seed + len(timesteps))
    known_error = float(((known - z.double()) ** 2).mean())
    result = {}
    for i, t in enumerate(timesteps):
        _, error = estimate(t, seed + i)
        a = float(alphas[t])
        result[t] = (error, a / (1 - a) * known_error)
    return result


def position_captions(scene: Scene, kind: str) -> str:
    """The scene's caption naming each object's place ("true"), its place mirrored left-right ("mirrored"),
    or none ("plain")."""
    if kind == "plain":
        return make_caption(scene.background, scene.objects)
    objects = scene.objects if kind == "true" else [dataclasses.replace(o, center=(1 - o.center[0], o.center[1])) for o in scene.objects]
    return make_caption(scene.background, objects, positions=True)


def names_positions(tokenizer: Any) -> bool:
    """Whether every position word is one token (the model can have been trained with them)."""
    return not words_not_single_tokens(tokenizer, POSITION_WORDS)


@torch.no_grad()
def position_word_use(backbone: Any, scenes: Sequence[Scene], timesteps: Sequence[int] = TIMESTEPS, seed: int = 0) -> dict[int, dict[str, float]]:
    """``{t: {"true" | "mirrored" | "plain": mean squared noise error}}`` with the captions of
    `position_captions` and no grounding tokens; the noise as in `grounded_predictions`."""
    z = encode_scenes(backbone, scenes)[0]
    texts = {kind: backbone.encode_prompt([position_captions(s, kind) for s in scenes]) for kind in ("true", "mirrored", "plain")}
    kwargs = caption_only(backbone, scenes)
    result = {}
    for i, t in enumerate(timesteps):
        z_t, eps, t_batch = _noised(backbone, z, t, seed + i)
        result[t] = {kind: float(((backbone.predict_eps(z_t, t_batch, text, cross_attention_kwargs=kwargs).float() - eps.float()) ** 2).mean())
                     for kind, text in texts.items()}
    return result


def box_inside(boxes: torch.Tensor, n_visual: int) -> torch.Tensor:
    """``[B, slots, n_visual]``: whether each visual token's centre (row-major square grid) lies inside each
    slot's box (``boxes [B, slots, 4]``, x0, y0, x1, y1 as fractions of the side)."""
    side = math.isqrt(n_visual)
    if side * side != n_visual:
        raise ValueError(f"box_inside: {n_visual} visual tokens do not form a square grid")
    centres = (torch.arange(side, dtype=boxes.dtype, device=boxes.device) + 0.5) / side
    cy, cx = (c.flatten() for c in torch.meshgrid(centres, centres, indexing="ij"))
    x0, y0, x1, y1 = (boxes[..., i : i + 1] for i in range(4))
    return (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)


@torch.no_grad()
def grounding_attention(backbone: Any, scenes: Sequence[Scene], t: int = TIMESTEPS[0], seed: int = 0) -> dict[str, dict[str, float]]:
    """``{gated block: {"gate", "objects", "even", "output", "box_true", "box_mirrored"}}`` at noise level
    `t` (module docstring): tanh(alpha_attn); the mean attention share of the visual tokens on the real
    objects' grounding tokens; that share for attention spread evenly over the grounding slots;
    ``|tanh(alpha_attn) attn(...)[:n_visual]|/|x|`` (these with the true boxes); the attention on an
    object's token inside the box it was given over that inside the box mirrored, with the true and
    with the mirrored boxes given."""
    z, text = encode_scenes(backbone, scenes)
    z_t, _, t_batch = _noised(backbone, z, t, seed)
    result: dict[str, dict[str, float]] = {}

    def measure(fuser: Any, args: tuple, name: str, kind: str, grounding: dict[str, torch.Tensor]) -> None:
        x, objs = args
        n_visual, attn = x.shape[1], fuser.attn
        real = grounding["masks"].to(x.device).bool()  # [B, slots]
        h = fuser.norm1(torch.cat([x, fuser.linear(objs)], dim=1))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(h)), attn.head_to_batch_dim(attn.to_k(h)))
        probs = probs.reshape(len(x), attn.heads, *probs.shape[1:])[:, :, :n_visual, n_visual:].float()  # visual -> slots
        to_slot = probs.mean(1).transpose(1, 2)  # [B, slots, n_visual], mean over heads
        given = grounding["boxes"].to(x.device).float()
        in_given = box_inside(given, n_visual) & real[:, :, None]
        in_mirror = box_inside(mirror_boxes(given.reshape(-1, 4)).reshape(given.shape), n_visual) & real[:, :, None]
        m = result.setdefault(name, {})
        m[f"box_{kind}"] = float(to_slot[in_given].mean() / to_slot[in_mirror].mean())
        if kind == "true":
            gate = torch.tanh(fuser.alpha_attn)
            on_slots = probs.sum(-1)  # [B, heads, n_visual]
            m["gate"] = float(gate)
            m["objects"] = float((probs * real[:, None, None, :]).sum(-1).mean())
            m["even"] = float((on_slots * real.sum(-1)[:, None, None] / real.shape[1]).mean())
            m["output"] = float((gate * attn(h)[:, :n_visual]).float().norm() / x.float().norm())

    for kind in ("true", "mirrored"):
        grounding = scene_grounding(backbone, scenes, kind)
        handles = [block.fuser.register_forward_hook(
            lambda fuser, args, out, name=name.replace(".transformer_blocks.0", ""), kind=kind, grounding=grounding:
            measure(fuser, args, name, kind, grounding)) for name, block in gated_blocks(backbone.unet)]
        try:
            backbone.predict_eps(z_t, t_batch, text, cross_attention_kwargs={"gligen": grounding})
        finally:
            for handle in handles:
                handle.remove()
    return result


def ridge_probe(train: torch.Tensor, test: torch.Tensor, ridge: float = 1e-2) -> tuple[float, float]:
    """Fit ``(x, y) ~ [f, 1] W`` on the centre tokens' features of ``train [B, N, C]`` (N = side^2 tokens,
    row-major; the centre: the middle half of the grid in both directions), score on the centre tokens of
    ``test``: (mean absolute error, the same error of predicting their mean). Fitted on the centre alone,
    so that the border tokens, whose features the zero padding marks in other ways, do not bend the fit."""
    n_tokens, channels = train.shape[1], train.shape[2]
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"ridge_probe: {n_tokens} tokens do not form a square grid")
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=1).double()
    lo, hi = side // 4, side - side // 4
    centre = ((coords >= lo) & (coords < hi)).all(dim=1)
    coords = coords[centre]

    def design(features: torch.Tensor) -> torch.Tensor:
        flat = features[:, centre].reshape(-1, channels).double()
        return torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], dim=1)

    a = design(train)
    weights = torch.linalg.solve(a.T @ a + ridge * torch.eye(channels + 1, dtype=a.dtype), a.T @ coords.repeat(train.shape[0], 1))
    predicted = (design(test) @ weights).reshape(test.shape[0], len(coords), 2)
    error = (predicted - coords).abs().mean()
    chance = (coords - coords.mean(dim=0)).abs().mean()
    return float(error), float(chance)


@torch.no_grad()
def block_features(backbone: Any, encoded: tuple[torch.Tensor, torch.Tensor], t: int, seed: int,
                   kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The hidden states ``[B, N, C]`` entering every transformer block of the UNet for `encode_scenes`'
    latents and captions noised at `t`, with `kwargs` as cross_attention_kwargs (`caption_only`)."""
    from diffusers.models.attention import BasicTransformerBlock

    features, handles = {}, []
    for name, module in backbone.unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            def keep(mod: Any, args: tuple, kwargs: dict, name: str = name) -> None:
                features[name] = (args[0] if args else kwargs["hidden_states"]).detach().float().cpu()
            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        z, text = encoded
        z_t, _, t_batch = _noised(backbone, z, t, seed)
        backbone.predict_eps(z_t, t_batch, text, cross_attention_kwargs=kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return features


def position_code(backbone: Any, train_scenes: Sequence[Scene], test_scenes: Sequence[Scene], timesteps: Sequence[int] = TIMESTEPS,
                  seed: int = 0) -> dict[int, dict[str, tuple[int, float, float]]]:
    """``{t: {block: (grid side, centre error, chance error)}}`` of `ridge_probe` (module docstring), for
    the blocks on grids of 4x4 tokens or more (a smaller grid has no centre)."""
    train_encoded, test_encoded = encode_scenes(backbone, train_scenes), encode_scenes(backbone, test_scenes)
    train_kwargs, test_kwargs = caption_only(backbone, train_scenes), caption_only(backbone, test_scenes)
    result = {}
    for i, t in enumerate(timesteps):
        train = block_features(backbone, train_encoded, t, seed + i, train_kwargs)
        test = block_features(backbone, test_encoded, t, seed + 100 + i, test_kwargs)
        sides = {name: math.isqrt(features.shape[1]) for name, features in train.items()}
        result[t] = {name: (side, *ridge_probe(train[name], test[name])) for name, side in sides.items() if side >= 4}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="a toy-world model (GLIGEN or not): built-in name or folder")
    parser.add_argument("--n", type=int, default=128, help="scenes per check (the probe fits on n, scores on n/2 more)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    parser.add_argument("--fixed-pattern", type=float, default=0.0,
                        help="the `pretrain data.fixed_pattern` the model was trained with: the probe's scenes carry it too")
    parser.add_argument("--fixed-pattern-cell", type=int, default=FIXED_PATTERN_CELL, help="its `data.fixed_pattern_cell`")
    args = parser.parse_args(argv)

    backbone = load_backbone(args.model)
    resolution = backbone.resolution
    scenes = [random_scene((PROBE_SEED, i), resolution=resolution, pattern=args.fixed_pattern,
                           pattern_cell=args.fixed_pattern_cell) for i in range(args.n + args.n // 2)]
    if is_gligen(backbone.unet):
        print(f"box use: mean squared noise error on {args.n} scenes, grounding with the true boxes / mirrored boxes / none")
        predictions = grounded_predictions(backbone, scenes[: args.n], args.timesteps)
        for t, errors in box_use(predictions).items():
            print(f"  t={t}: " + "  ".join(f"{kind} {errors[kind]:.5f}" for kind in GROUNDINGS))
        print("box reach: how far the predicted noise moves, |eps_true - eps_other| / |eps_true|, with the boxes mirrored / no grounding")
        for t, moves in box_reach(predictions).items():
            print(f"  t={t}: mirrored {moves['mirrored']:.1e}  none {moves['none']:.1e}")
        t = args.timesteps[0]
        print(f"grounding attention at t={t}: gate tanh(alpha_attn) | attention share on the real objects' tokens "
              "(that share spread evenly over the slots) | |gated output| / |x| | attention on an object's token inside "
              "the box given / inside that box mirrored, true boxes given, mirrored boxes given")
        for name, m in grounding_attention(backbone, scenes[: args.n], t).items():
            print(f"  {name}: gate {m['gate']:+.3f} | objects {m['objects']:.4f} ({m['even']:.4f}) | output {m['output']:.3f}"
                  f" | in box {m['box_true']:.2f}, mirrored {m['box_mirrored']:.2f}")
    else:
        print(f"{args.model}: no GLIGEN layers, so box use and grounding attention are not probed")
    if names_positions(backbone.tokenizer):
        print(f"position words: mean squared noise error on {args.n} scenes, no grounding tokens, captions naming each object's "
              "true place / its place mirrored left-right / no place")
        for t, errors in position_word_use(backbone, scenes[: args.n], args.timesteps).items():
            print(f"  t={t}: " + "  ".join(f"{kind} {errors[kind]:.5f}" for kind in ("true", "mirrored", "plain")))
    print("layout reward: the noise error at high noise, and what it would be if the model knew the scene as well as at t=600")
    for t, (error, known) in layout_reward(backbone, scenes[: args.n]).items():
        print(f"  t={t}: {error:.5f} -> {known:.5f}")
    print("position code: ridge probe features -> token (x, y), fitted and scored on the centre tokens, mean absolute error "
          "(chance: their mean)")
    for t, blocks in position_code(backbone, scenes[: args.n], scenes[args.n:], args.timesteps).items():
        print(f"  t={t}: " + " | ".join(f"{name.replace('.transformer_blocks.0', '')} {side}x{side} {err:.2f} ({chance:.2f})"
                                       for name, (side, err, chance) in blocks.items()))


if __name__ == "__main__":
    main()
