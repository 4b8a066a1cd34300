"""Ground-A-Score: the aggregated gradient equals the formula (masks with the overlap rule, null-text
penalty, beta_t full-prompt term, box PatchNCE) and the sum of the sequential per-subtask gradients,
on the tiny SD and the tiny SDXL model (`backbone` of tests.test_distill_methods)."""
from __future__ import annotations

import pytest
import torch

from dreamsteer.distill.editor import Editor
from dreamsteer.distill.masks import box_region
from dreamsteer.distill.methods import Draw, Subtask
from tests.test_distill_methods import (
    SRC,
    backbone,  # noqa: F401 - fixtures
    cfg_of,
    eps_of,
    grid,
    guided,
    hooked_features,
    nce_direct,
    noised,
    unet_eps,
    up_self_layers,
    z_cur,  # noqa: F401 - fixtures
    z_src,  # noqa: F401
)

TGT = "a photo of a dog wearing a hat"
BOX_A = [0.0, 0.0, 0.3, 0.3]  # latent (0, 0, 5, 5): small -> penalty
BOX_B = [0.1, 0.1, 0.9, 0.9]  # latent (2, 2, 14, 14): large, preserved; contains part of A


def subtasks():
    return [Subtask("cat", "dog", box_region(BOX_A, (16, 16))),
            Subtask("cat", "cat", box_region(BOX_B, (16, 16)), preserve=True)]


def the_draw():
    eps = torch.randn((3, 4, 16, 16), generator=torch.Generator().manual_seed(21))
    return Draw(torch.tensor([300, 500, 700]), eps, torch.tensor([11, 12, 13]))


def test_masks_overlap_rule_and_union():
    from dreamsteer.distill.masks import resolve_overlaps, union

    a, b = box_region(BOX_A, (16, 16)), box_region(BOX_B, (16, 16))
    assert a.box == (0, 0, 5, 5) and b.box == (2, 2, 14, 14)
    ma, mb = resolve_overlaps([a.mask, b.mask], 0.3)
    torch.testing.assert_close(ma, a.mask)  # the small object keeps its full mask
    assert float(mb[0, 0, 3, 3]) == pytest.approx(0.3) and float(mb[0, 0, 10, 10]) == 1.0 and float(mb[0, 0, 0, 0]) == 0.0
    assert float(union([ma, mb]).sum()) == 25 + 144 - 9


def test_ground_a_score_gradient_equals_formula(backbone, z_src, z_cur):
    bb = backbone
    cfg = cfg_of("ground_a_score", n_patches=100000)
    ed = Editor(bb, cfg, SRC, TGT, z_src, subtasks())
    d = the_draw()
    with ed.recorder:
        out = ed.method.step(z_cur, d, ed.ctx)

    m_a = torch.zeros(1, 1, 16, 16)
    m_a[..., 0:5, 0:5] = 1
    m_b = torch.zeros(1, 1, 16, 16)
    m_b[..., 2:14, 2:14] = 1
    m_b[..., 2:5, 2:5] = 0.3  # overlap with the smaller box A
    m_full = ((m_a + m_b) > 0).float()
    terms = [("cat", "dog", m_a), ("cat", "cat", m_b), (SRC, TGT, m_full)]
    expected = torch.zeros_like(z_cur)
    for j, (src, tgt, m) in enumerate(terms):
        t, eps = d.t[j : j + 1], d.eps[j : j + 1]
        x, x_src = noised(bb, z_cur, eps, t), noised(bb, z_src, eps, t)
        g = m * (guided(bb, x, t, tgt, 7.5) - guided(bb, x_src, t, src, 7.5))
        if j == 0:  # area 0.09 < 0.15: null-text penalty
            gamma = (5 * (eps_of(bb, x, t, "") - eps_of(bb, x, t, tgt))).abs().mul(m).mean().clamp(0, 1)
            assert 0 < float(gamma) < 1
            g = gamma * g
        if j == 2:  # full prompt: beta_t = [0.5, 0.4, 0.3, 0.2, 0.1][700 // 200]
            g = 0.2 * g
        expected += g
    torch.testing.assert_close(out.raw, expected, rtol=1e-4, atol=1e-4)

    # box PatchNCE of the preserved subtask B, masked by its mask
    t, eps = d.t[1:2], d.eps[1:2]
    names = up_self_layers(bb.unet)
    with hooked_features(bb.unet, names) as ref:
        eps_of(bb, noised(bb, z_src, eps, t), t, "cat")
    ref = {n: v.detach() for n, v in ref.items()}
    leaf = z_cur.clone().requires_grad_(True)
    with hooked_features(bb.unet, names) as cur:
        unet_eps(bb, noised(bb, leaf, eps, t), t, "cat")
        loss = 0.0
        for n in names:
            r, c = grid(ref[n]), grid(cur[n])
            s = r.shape[1]
            x0, y0, x1, y1 = (int(round(v * s / 16)) for v in (2, 2, 14, 14))
            loss = loss + nce_direct(r[:, y0:y1, x0:x1], c[:, y0:y1, x0:x1], [1, 2], 0.07)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(out.extra, cfg.w_cut * m_b * grad, rtol=1e-3, atol=1e-6)
    assert ed.scorer.calls == 3  # 12 rows in chunks of max_batch=8, + the PatchNCE pass


def test_batched_equals_sum_of_sequential_subtasks(backbone, z_src, z_cur):
    bb = backbone
    d = the_draw()
    batched = Editor(bb, cfg_of("ground_a_score", max_batch=16), SRC, TGT, z_src, subtasks())
    seq = Editor(bb, cfg_of("ground_a_score", aggregate=False), SRC, TGT, z_src, subtasks())
    assert batched.method.units(batched.ctx) == [None] and seq.method.units(seq.ctx) == [0, 1, 2]
    with batched.recorder:
        all_at_once = batched.method.step(z_cur, d, batched.ctx)
    assert batched.scorer.calls == 2  # one call for the 12 noise predictions, one PatchNCE pass
    raw, extra = torch.zeros_like(z_cur), torch.zeros_like(z_cur)
    with seq.recorder:
        for k in range(3):
            part = seq.method.step(z_cur, Draw(d.t[k : k + 1], d.eps[k : k + 1], d.seeds[k : k + 1]), seq.ctx, unit=k)
            raw += part.raw
            if part.extra is not None:
                extra += part.extra
    torch.testing.assert_close(all_at_once.raw, raw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(all_at_once.extra, extra, rtol=1e-4, atol=1e-6)


def test_sequential_mode_takes_one_optimizer_step_per_term(backbone, z_src):
    seq = Editor(backbone, cfg_of("ground_a_score", aggregate=False, steps=2), SRC, TGT, z_src, subtasks()[:1])
    result = seq.run(seed=0, progress=False)
    assert len(result.trace["steps"]) == 2 * 2  # 2 iterations x (1 subtask + full prompt)


@pytest.mark.parametrize("box", [[0.5, 0.5, 0.5, 0.9], [-0.1, 0, 0.5, 0.5], [0, 0, 1.2, 1]])
def test_bad_boxes_raise(box):
    from dreamsteer.distill.masks import MaskError

    with pytest.raises(MaskError, match="box"):
        box_region(box, (16, 16))
