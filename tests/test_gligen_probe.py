"""benchmarks.gligen_probe: the box-use check against a noise error computed here, the position probe on
features whose position code is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamsteer.benchmarks.gligen_probe import (block_features, box_inside, box_reach, box_use, caption_only, encode_scenes, grounded_predictions, grounding_attention, layout_reward, main,
                                                mirror_boxes, names_positions, position_captions, position_word_use, ridge_probe)
from dreamsteer.data.scenes import SceneObject, random_scene, render
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.diffusion.gligen import MAX_OBJECTS, gated_blocks, grounding_inputs, set_fuser


def test_mirror_boxes_keeps_sizes_and_rows():
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.0, 1.0, 0.25]])
    expected = torch.tensor([[0.6, 0.2, 0.9, 0.6], [0.0, 0.0, 0.5, 0.25]])
    assert torch.allclose(mirror_boxes(boxes), expected)


def test_box_inside_reads_columns_as_x_and_rows_as_y():
    # 4x4 grid, token centres at 0.125, 0.375, 0.625, 0.875; token index = row * 4 + column
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.5, 0.25, 1.0, 0.75]]])
    inside = box_inside(boxes, 16)
    assert inside.shape == (1, 2, 16)
    assert inside[0, 0].nonzero().flatten().tolist() == [0, 1]
    assert inside[0, 1].nonzero().flatten().tolist() == [6, 7, 10, 11]
    with pytest.raises(ValueError, match="square grid"):
        box_inside(boxes, 12)


def _grid_coords(side: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1).float()


def test_ridge_probe_reads_a_linear_position_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    side, channels = 8, 12
    coords = _grid_coords(side)
    mixing = torch.randn(2, channels, generator=g)

    def coded(batch: int) -> torch.Tensor:
        return coords @ mixing + 0.01 * torch.randn(batch, side * side, channels, generator=g)

    error, chance = ridge_probe(coded(16), coded(8))
    # Centre tokens of an 8x8 grid: columns and rows 2..5, mean 3.5, so predicting the mean is off by 1.0.
    assert chance == pytest.approx(1.0)
    assert error < 0.05
    noise_error, _ = ridge_probe(torch.randn(16, side * side, channels, generator=g), torch.randn(8, side * side, channels, generator=g))
    assert noise_error > 0.9


def test_ridge_probe_scores_the_centre_only():
    """Features that give away only the border tokens' places leave the centre at chance."""
    side = 8
    coords = _grid_coords(side)
    border = torch.where((coords < 2) | (coords >= side - 2), coords, torch.full_like(coords, 3.5))
    g = torch.Generator().manual_seed(1)

    def features(batch: int) -> torch.Tensor:
        return border + 0.01 * torch.randn(batch, side * side, 2, generator=g)

    error, chance = ridge_probe(features(16), features(8))
    assert error == pytest.approx(chance, abs=0.05)


def test_ridge_probe_fits_the_centre_whatever_the_border_says():
    """A code linear in the centre tokens is read there even when the border tokens carry another code
    (as the zero padding gives them); a probe fitted on every token would be bent by the border."""
    side = 8
    coords = _grid_coords(side)
    rim = ((coords < 2) | (coords >= side - 2)).any(dim=1, keepdim=True)
    code = torch.where(rim, 10 * (coords - 3.5) ** 2, coords)  # quadratic at the border, linear inside
    g = torch.Generator().manual_seed(2)

    def features(batch: int) -> torch.Tensor:
        return code + 0.01 * torch.randn(batch, side * side, 2, generator=g)

    error, chance = ridge_probe(features(16), features(8))
    assert chance == pytest.approx(1.0) and error < 0.05
    # The same least squares over every token, written here, misses the centre by far more.
    a = torch.cat([features(16).reshape(-1, 2), torch.ones(16 * side * side, 1)], dim=1).double()
    w = torch.linalg.lstsq(a, coords.repeat(16, 1).double()).solution
    test = features(8)
    centre = ~rim[:, 0]
    predicted = torch.cat([test.reshape(-1, 2), torch.ones(8 * side * side, 1)], dim=1).double() @ w
    assert (predicted.reshape(8, -1, 2)[:, centre] - coords[centre]).abs().mean() > 0.5


def test_ridge_probe_refuses_a_grid_that_is_not_square():
    with pytest.raises(ValueError, match="square grid"):
        ridge_probe(torch.zeros(2, 12, 4), torch.zeros(2, 12, 4))


@pytest.fixture(scope="module")
def open_gligen():
    backbone = load_backbone("tiny-gligen")
    with torch.no_grad():
        for _, block in gated_blocks(backbone.unet):
            block.fuser.alpha_attn.fill_(1.0)
    return backbone


def _noisy_latents(backbone, scenes, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, eps, z_t) computed directly from the scenes' pixels, the VAE and the scheduler's alphas, for comparison."""
    pixels = torch.stack([torch.from_numpy(np.asarray(s.image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for s in scenes])
    with torch.no_grad():
        z = backbone.vae.encode(pixels).latent_dist.mean * backbone.vae.config.scaling_factor
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    a = backbone.scheduler.alphas_cumprod[t]
    return z, eps, a.sqrt() * z + (1 - a).sqrt() * eps


def _grounding(backbone, scenes, mirrored: bool) -> dict[str, torch.Tensor]:
    """GLIGEN's inputs for the scenes' phrases and pixel boxes (mirrored left-right if asked), built here."""
    size = backbone.resolution
    parts = []
    for s in scenes:
        boxes = s.boxes.astype(np.float64) / size
        if mirrored:
            boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
        parts.append(grounding_inputs(backbone, s.phrases, boxes.tolist()))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _noise_error(backbone, scenes, t: int, seed: int, mirrored: bool) -> float:
    """The noise error computed directly from the scenes' pixels and the UNet, for comparison."""
    _, eps, z_t = _noisy_latents(backbone, scenes, t, seed)
    with torch.no_grad():
        pred = backbone.unet(z_t, torch.full((len(scenes),), t), encoder_hidden_states=backbone.encode_prompt([s.caption for s in scenes]),
                             cross_attention_kwargs={"gligen": _grounding(backbone, scenes, mirrored)}).sample
    return float(((pred - eps) ** 2).mean())


def test_box_use_matches_a_direct_computation_and_sees_the_boxes(open_gligen):
    scenes = [random_scene((7, i), resolution=open_gligen.resolution) for i in range(3)]
    errors = box_use(grounded_predictions(open_gligen, scenes, timesteps=(800, 300), seed=5))
    assert errors[800]["true"] == pytest.approx(_noise_error(open_gligen, scenes, 800, 5, mirrored=False), rel=1e-5)
    assert errors[800]["mirrored"] == pytest.approx(_noise_error(open_gligen, scenes, 800, 5, mirrored=True), rel=1e-5)
    assert errors[300]["true"] == pytest.approx(_noise_error(open_gligen, scenes, 300, 6, mirrored=False), rel=1e-5)
    assert errors[800]["true"] != errors[800]["mirrored"] and errors[800]["true"] != errors[800]["none"]


def test_box_reach_is_the_relative_move_of_the_prediction(open_gligen):
    scenes = [random_scene((7, i), resolution=open_gligen.resolution) for i in range(3)]
    reach = box_reach(grounded_predictions(open_gligen, scenes, timesteps=(800,), seed=5))[800]
    _, _, z_t = _noisy_latents(open_gligen, scenes, 800, 5)
    with torch.no_grad():
        text = open_gligen.encode_prompt([s.caption for s in scenes])

        def predict(mirrored: bool, masks_off: bool) -> torch.Tensor:
            gligen = _grounding(open_gligen, scenes, mirrored)
            if masks_off:
                gligen["masks"] = torch.zeros_like(gligen["masks"])
            return open_gligen.unet(z_t, torch.full((3,), 800), encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample

        true = predict(False, False)
        expected_mirrored = float((true - predict(True, False)).norm() / true.norm())
        expected_none = float((true - predict(False, True)).norm() / true.norm())
    assert reach["mirrored"] == pytest.approx(expected_mirrored, rel=1e-4) and expected_mirrored > 0
    assert reach["none"] == pytest.approx(expected_none, rel=1e-4) and expected_none > 0


def test_layout_reward_prices_the_error_at_t_by_the_estimate_at_the_lower_noise():
    """Against a computation written here: the noise error at t, and a_t / (1 - a_t) times the clean-latent
    error of the estimate at `known_at` (each level with its own noise draw)."""
    backbone = load_backbone("tiny")
    scenes = [random_scene((11, i), resolution=backbone.resolution) for i in range(3)]
    reward = layout_reward(backbone, scenes, timesteps=(900, 700), known_at=400, seed=3)
    alphas = backbone.scheduler.alphas_cumprod.double()
    with torch.no_grad():
        text = backbone.encode_prompt([s.caption for s in scenes])
        z, _, z_t = _noisy_latents(backbone, scenes, 400, 3 + 2)
        pred = backbone.unet(z_t, torch.full((3,), 400), encoder_hidden_states=text).sample
        x0 = (z_t.double() - (1 - alphas[400]).sqrt() * pred.double()) / alphas[400].sqrt()
        known = float(((x0 - z.double()) ** 2).mean())
        for i, t in enumerate((900, 700)):
            _, eps_t, z_t = _noisy_latents(backbone, scenes, t, 3 + i)
            pred_t = backbone.unet(z_t, torch.full((3,), t), encoder_hidden_states=text).sample
            assert reward[t][0] == pytest.approx(float(((pred_t - eps_t) ** 2).mean()), rel=1e-4)
            assert reward[t][1] == pytest.approx(float(alphas[t] / (1 - alphas[t])) * known, rel=1e-4)
    assert reward[900][1] < reward[700][1]  # the same estimate costs less where the signal is weaker


def test_a_gligen_model_is_probed_caption_only_with_its_null_tokens_not_without_its_gated_layers(open_gligen):
    """GLIGEN models are trained with their gated layers always on (null tokens where the grounding is
    dropped): the caption-only checks must run them so, not with the layers skipped (no gligen kwargs)."""
    scenes = [random_scene((12, i), resolution=open_gligen.resolution) for i in range(2)]
    reward = layout_reward(open_gligen, scenes, timesteps=(900,), known_at=600, seed=5)
    null = _grounding(open_gligen, scenes, mirrored=False)
    null["masks"] = torch.zeros_like(null["masks"])
    text = open_gligen.encode_prompt([s.caption for s in scenes])
    _, eps, z_t = _noisy_latents(open_gligen, scenes, 900, 5)
    with torch.no_grad():
        pred = {kwargs is None: open_gligen.unet(z_t, torch.full((2,), 900), encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
                for kwargs in ({"gligen": null}, None)}
    assert reward[900][0] == pytest.approx(float(((pred[False] - eps) ** 2).mean()), rel=1e-4)
    assert reward[900][0] != pytest.approx(float(((pred[True] - eps) ** 2).mean()), rel=1e-3)  # the gated layers count
    encoded = encode_scenes(open_gligen, scenes)
    with_null, skipped = (block_features(open_gligen, encoded, 600, 0, kwargs) for kwargs in (caption_only(open_gligen, scenes), None))
    assert any(not torch.allclose(with_null[k], skipped[k]) for k in with_null)  # blocks after a gated layer see it
    assert caption_only(load_backbone("tiny"), scenes) is None


def test_box_use_compares_the_groundings_on_the_same_noise(open_gligen):
    """With the gated layers off the three groundings must give the same error to the last bit."""
    scenes = [random_scene((8, i), resolution=open_gligen.resolution) for i in range(2)]
    set_fuser(open_gligen.unet, False)
    try:
        errors = box_use(grounded_predictions(open_gligen, scenes, timesteps=(600,)))[600]
    finally:
        set_fuser(open_gligen.unet, True)
    assert errors["true"] == errors["mirrored"] == errors["none"]


def test_cli_prints_both_checks_for_a_gligen_model(capsys):
    main(["--model", "tiny-gligen", "--n", "4", "--timesteps", "900"])
    out = capsys.readouterr().out
    assert "box use" in out and "t=900: true" in out and "box reach" in out and "t=900: mirrored" in out
    assert "layout reward" in out and "t=950: " in out
    assert "grounding attention at t=900" in out and "down_blocks.1.attentions.0: gate" in out and "| in box " in out
    assert "position code" in out and "8x8" in out


def test_grounding_attention_with_uniform_attention_gives_the_objects_their_even_share():
    """With the queries zeroed every token attends evenly to all n_visual + 30 tokens, so a scene's real
    objects get n_objects / (n_visual + 30) of each visual token's attention: the even share exactly."""
    backbone = load_backbone("tiny-gligen")
    blocks = gated_blocks(backbone.unet)
    with torch.no_grad():
        for _, block in blocks:
            block.fuser.alpha_attn.fill_(0.5)
            block.fuser.attn.to_q.weight.zero_()
            if block.fuser.attn.to_q.bias is not None:
                block.fuser.attn.to_q.bias.zero_()
    scenes = [random_scene((9, i), resolution=backbone.resolution) for i in range(3)]
    counts = torch.tensor([len(s.phrases) for s in scenes], dtype=torch.float64)
    sides = {}

    def count(module, args, name):  # the visual token count of each gated layer, read from its input
        sides[name] = args[0].shape[1]

    for name, block in blocks:
        block.fuser.register_forward_pre_hook(lambda m, args, name=name.replace(".transformer_blocks.0", ""): count(m, args, name))
    result = grounding_attention(backbone, scenes, t=700)
    assert set(result) == set(sides) and len(result) == len(blocks) >= 2
    for name, m in result.items():
        expected = float((counts / (sides[name] + MAX_OBJECTS)).mean())
        assert m["objects"] == pytest.approx(expected, rel=1e-4)
        assert m["even"] == pytest.approx(expected, rel=1e-4)
        assert m["box_true"] == pytest.approx(1.0, rel=1e-4) and m["box_mirrored"] == pytest.approx(1.0, rel=1e-4)
        assert m["gate"] == pytest.approx(float(np.tanh(0.5)))


def test_grounding_attention_output_is_what_the_gated_attention_adds():
    """With the dense gate shut a fuser returns ``x + tanh(alpha_attn) attn(...)``: its output minus its input.
    The objects' share and the in-box ratios against an attention and box tests computed here, in pixels."""
    backbone = load_backbone("tiny-gligen")
    with torch.no_grad():
        for _, block in gated_blocks(backbone.unet):
            block.fuser.alpha_attn.fill_(1.0)
            block.fuser.alpha_dense.zero_()
    scenes = [random_scene((10, i), resolution=backbone.resolution) for i in range(2)]
    size = backbone.resolution
    real = torch.cat([grounding_inputs(backbone, s.phrases, (s.boxes / size).tolist())["masks"] for s in scenes]).bool()
    calls = {}  # per layer, one entry per forward pass: the true boxes first, then the mirrored ones

    def keep(module, args, out, name):
        x, objs = args
        n_visual, side = x.shape[1], int(round(x.shape[1] ** 0.5))
        h = module.norm1(torch.cat([x, module.linear(objs)], dim=1))
        heads = module.attn.heads
        q = module.attn.to_q(h).unflatten(-1, (heads, -1))  # [B, N, heads, d]
        k = module.attn.to_k(h).unflatten(-1, (heads, -1))
        probs = torch.einsum("bihd,bjhd->bhij", q, k).div(q.shape[-1] ** 0.5).softmax(-1)[:, :, :n_visual, n_visual:]
        mirrored = len(calls.get(name, [])) == 1
        given, other = [], []  # attention on scene 0's object tokens from tokens in the box given / the other box
        for o, (x0, y0, x1, y1) in enumerate(scenes[0].boxes.tolist()):  # the true box in pixels
            flipped = (size - x1, y0, size - x0, y1)
            boxes = (flipped, (x0, y0, x1, y1)) if mirrored else ((x0, y0, x1, y1), flipped)
            for i in range(n_visual):
                cx, cy = (i % side + 0.5) * size / side, (i // side + 0.5) * size / side
                a = float(probs[0, :, i, o].mean())
                for box, values in zip(boxes, (given, other)):
                    if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
                        values.append(a)
        calls.setdefault(name, []).append({
            "added": float((out - x).norm() / x.norm()),
            "share": float(probs[0][..., real[0]].sum(-1).mean()),  # visual tokens -> scene 0's objects
            "box": float(np.mean(given) / np.mean(other)) if given and other else float("nan"),
        })

    handles = []
    for name, block in gated_blocks(backbone.unet):
        handles.append(block.fuser.register_forward_hook(lambda m, a, o, name=name.replace(".transformer_blocks.0", ""): keep(m, a, o, name)))
    try:
        result = grounding_attention(backbone, scenes, t=500, seed=3)
        for name, m in result.items():
            assert len(calls[name]) == 2
            assert m["output"] == pytest.approx(calls[name][0]["added"], rel=1e-4) and m["output"] > 0
            assert m["gate"] == pytest.approx(float(np.tanh(1.0)))
            assert 0 < m["objects"] < 1 and m["objects"] != pytest.approx(m["even"], rel=1e-3)  # tiny's random keys are not even
        calls.clear()
        single = grounding_attention(backbone, scenes[:1], t=500, seed=3)  # scene 0 alone, against the attention computed here
    finally:
        for handle in handles:
            handle.remove()
    checked = uneven = 0
    for name, m in single.items():
        assert m["objects"] == pytest.approx(calls[name][0]["share"], rel=1e-4)
        if not np.isnan(calls[name][0]["box"]):
            assert m["box_true"] == pytest.approx(calls[name][0]["box"], rel=1e-4)
            assert m["box_mirrored"] == pytest.approx(calls[name][1]["box"], rel=1e-4)
            checked += 1
            uneven += m["box_true"] != pytest.approx(1.0, rel=1e-3)  # random keys: not the same everywhere
    assert checked >= 1 and uneven >= 1


def test_position_captions_name_the_true_and_the_mirrored_places():
    scene = render("gray", [SceneObject("circle", "red", (0.2, 0.2), 0.14), SceneObject("star", "blue", (0.5, 0.8), 0.14)])
    assert position_captions(scene, "true") == "a red circle top left and a blue star bottom on a gray background"
    assert position_captions(scene, "mirrored") == "a red circle top right and a blue star bottom on a gray background"
    assert position_captions(scene, "plain") == scene.caption == "a red circle and a blue star on a gray background"


def test_position_word_use_matches_a_direct_computation_without_grounding(open_gligen):
    """The error for each kind of caption, on the same noise, with GLIGEN's null tokens only."""
    scenes = [render("white", [SceneObject("square", "green", (0.25, 0.5), 0.2)], open_gligen.resolution), random_scene((9, 0), resolution=open_gligen.resolution)]
    errors = position_word_use(open_gligen, scenes, timesteps=(700,), seed=3)[700]
    _, eps, z_t = _noisy_latents(open_gligen, scenes, 700, 3)
    with torch.no_grad():
        null = _grounding(open_gligen, scenes, mirrored=False)
        null["masks"] = torch.zeros_like(null["masks"])
        for kind in ("true", "mirrored", "plain"):
            captions = [position_captions(s, kind) for s in scenes]
            pred = open_gligen.unet(z_t, torch.full((2,), 700), encoder_hidden_states=open_gligen.encode_prompt(captions),
                                    cross_attention_kwargs={"gligen": null}).sample
            assert errors[kind] == pytest.approx(float(((pred - eps) ** 2).mean()), rel=1e-5), kind
    assert errors["true"] != errors["mirrored"]  # "left" against "right": other captions


def test_the_position_word_check_runs_only_for_a_tokenizer_with_the_words(capsys):
    """tiny-gligen's tokenizer spells "bottom" in pieces: no model of it was trained with position words."""
    assert not names_positions(load_backbone("tiny-gligen").tokenizer)
    main(["--model", "tiny-gligen", "--n", "2", "--timesteps", "900"])
    assert "position words" not in capsys.readouterr().out
