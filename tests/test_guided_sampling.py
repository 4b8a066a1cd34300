"""Spatial-feature guided DDIM sampling lowers the feature energy against the source."""
from __future__ import annotations

import pytest
import torch

from dreamsteer.distill.guided_sampling import (
    GUIDANCE_MODES,
    build_feature_guidance,
    ddim_sample,
    feature_energy,
    feature_layers,
    make_guidance,
)


@pytest.fixture(scope="module")
def setup(tiny_backbone):
    bb = tiny_backbone
    gen = torch.Generator().manual_seed(0)
    z_src = torch.randn(1, 4, 16, 16, generator=gen)
    noise = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        cond, null = bb.encode_prompt(["a photo of a sks cat", ""]).chunk(2)
    return bb, z_src, noise, cond, null


def _final_energy(bb, z, z_src, noise, cond, layers, t_eval=300):
    t = torch.tensor([t_eval])
    with torch.no_grad():
        return feature_energy(bb, bb.add_noise(z, noise, t), bb.add_noise(z_src.expand_as(z), noise, t), t, cond, layers)


def test_guided_sampling_ends_with_lower_feature_energy_than_unguided(setup):
    bb, z_src, noise, cond, null = setup
    steps = 8
    unguided = ddim_sample(bb, noise, cond, null, steps, 7.5, None)
    guidance = build_feature_guidance(bb, z_src, noise, cond, {"weight": 0.2, "start": 0.0, "end": 0.5})
    guided = ddim_sample(bb, noise, cond, null, steps, 7.5, guidance)
    layers = feature_layers(bb.unet)
    e_guided = _final_energy(bb, guided, z_src, noise, cond, layers)
    e_unguided = _final_energy(bb, unguided, z_src, noise, cond, layers)
    assert (e_guided < e_unguided).all(), (e_guided, e_unguided)
    # guidance acted only inside its window: the first half of the steps
    assert sorted({move.step for move in guidance.moves}) == [0, 1, 2, 3]


@pytest.mark.parametrize("normalize", ["rms", "none"])
def test_every_guidance_move_lowers_the_energy_it_targets(setup, normalize):
    """Each move of x_t (recorded around `guide`) lowers E at the same t against the same noised source,
    recomputed here; the first move (t near T, E near its minimum) included."""
    bb, z_src, noise, cond, null = setup
    weight = 0.2 if normalize == "rms" else 50.0
    guidance = build_feature_guidance(bb, z_src, noise, cond, {"weight": weight, "start": 0.0, "end": 0.5, "normalize": normalize})
    layers = feature_layers(bb.unet)
    moves = []
    guide = guidance.guide
    guidance.guide = lambda x, t, i, n: moves.append((x.clone(), t, guide(x, t, i, n))) or moves[-1][2]
    ddim_sample(bb, noise, cond, null, 8, 7.5, guidance)
    assert len(moves) == 8
    moved = 0
    for x_before, t, x_after in moves:
        if torch.equal(x_before, x_after):
            continue  # outside the window
        a = bb.alphas_cumprod[t.long()].reshape(1, 1, 1, 1)
        x_src = a.sqrt() * z_src + (1 - a).sqrt() * noise  # each sample's own x_T
        with torch.no_grad():
            before = feature_energy(bb, x_before, x_src, t, cond, layers)
            after = feature_energy(bb, x_after, x_src, t, cond, layers)
        still = (x_before == x_after).flatten(1).all(dim=1)
        assert (after[~still] < before[~still]).all(), (int(t), before, after)
        moved += int((~still).sum())
    assert moved >= 4  # most samples of the window's 4 steps do move
    for move in guidance.moves:  # what the guidance records agrees
        assert ((move.after < move.before) | (move.scale == 0)).all()


def test_zero_weight_or_mode_none_is_plain_ddim(setup):
    bb, z_src, noise, cond, null = setup
    plain = ddim_sample(bb, noise, cond, null, 4, 7.5, None)
    idle = ddim_sample(bb, noise, cond, null, 4, 7.5, build_feature_guidance(bb, z_src, noise, cond, {"weight": 0.0}))
    torch.testing.assert_close(idle, plain, rtol=0, atol=0)
    assert make_guidance("none", bb, z_src, noise, cond, {}) is None
    assert "features" in GUIDANCE_MODES


def test_energy_gradient_direction_reduces_energy(setup):
    """One small move along -grad E lowers E (the guidance step's sign)."""
    bb, z_src, noise, cond, _ = setup
    layers = feature_layers(bb.unet, divisors=(2,))
    t = torch.tensor([500])
    x_src = bb.add_noise(z_src.expand_as(noise), noise, t)
    x = bb.add_noise(torch.randn_like(noise), noise, t).requires_grad_(True)
    energy = feature_energy(bb, x, x_src, t, cond, layers)
    (grad,) = torch.autograd.grad(energy.sum(), [x])
    with torch.no_grad():
        moved = feature_energy(bb, x - 1e-3 * grad / grad.abs().max(), x_src, t, cond, layers)
    assert (moved < energy.detach()).all()


def test_bad_guidance_options_fail(setup):
    bb, z_src, noise, cond, _ = setup
    with pytest.raises(ValueError, match="guidance mode 'boxes'"):
        make_guidance("boxes", bb, z_src, noise, cond, {})
    with pytest.raises(ValueError, match="window"):
        build_feature_guidance(bb, z_src, noise, cond, {"start": 0.6, "end": 0.2})
    with pytest.raises(ValueError, match="self-attention layer"):
        build_feature_guidance(bb, z_src, noise, cond, {"divisors": (16,)})
