"""Each method's gradient equals a direct computation from its formula, for a fixed (t, eps).

The direct computations call the UNet with its own attention processors (no recorder, no scorer),
one request at a time, and re-derive masks, penalties, schedules and PatchNCE here from the formulas.
Every test runs on the tiny SD model and on the tiny SDXL model, whose direct UNet calls get their text
inputs and added conditions from diffusers' own SDXL pipeline (`tests.conftest.direct_conditioning`).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from dreamsteer.distill.config import method_defaults
from dreamsteer.distill.editor import Editor, editor_config, encode_source
from dreamsteer.distill.methods import Draw
from tests.conftest import direct_conditioning

SRC = "a photo of a cat"
TGT = "a photo of a cat wearing a hat"
TOL = dict(rtol=1e-4, atol=1e-4)  # batched vs single UNet calls differ by float rounding, amplified by CFG


def cfg_of(method: str, **overrides):
    values = method_defaults(method)
    values.update(overrides)
    return editor_config(values)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def backbone(request):
    """The shared tiny backbone of each family (module-scoped: the SD tests run first, then the SDXL ones)."""
    return request.getfixturevalue({"sd": "tiny_backbone", "sdxl": "tiny_sdxl_backbone"}[request.param])


@pytest.fixture
def fresh(backbone):
    from dreamsteer.diffusion.backbone import load_backbone

    return load_backbone(backbone.source)


@pytest.fixture(scope="module")
def z_src(backbone):
    from dreamsteer.data.images import pil_to_tensor, resize_and_crop
    from dreamsteer.data.samples import sample_photo

    return encode_source(backbone, pil_to_tensor(resize_and_crop(sample_photo("cat"), backbone.resolution)))


@pytest.fixture(scope="module")
def z_cur(z_src):
    return z_src + 0.3 * torch.randn(z_src.shape, generator=torch.Generator().manual_seed(1))


def draw(t, n_noise=1, seed=3, seeds=None):
    t = torch.tensor(t if isinstance(t, list) else [t])
    eps = torch.randn((n_noise, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    return Draw(t, eps, torch.tensor(seeds or [7] * len(t)))


def unet_eps(bb, x, t, prompt):
    """The UNet called directly (graph kept to `x`), its text inputs from `direct_conditioning`."""
    hidden, kwargs = direct_conditioning(bb, [prompt], x)
    return bb.unet(x, t.reshape(1), encoder_hidden_states=hidden, **kwargs).sample


def eps_of(bb, x, t, prompt):
    with torch.no_grad():
        return unet_eps(bb, x, t, prompt)


def noised(bb, z, eps, t):
    a = bb.alphas_cumprod[t].reshape(1, 1, 1, 1)
    return a.sqrt() * z + (1 - a).sqrt() * eps


def guided(bb, x, t, prompt, w):
    null, cond = eps_of(bb, x, t, ""), eps_of(bb, x, t, prompt)
    return null + w * (cond - null)


def up_self_layers(unet):
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")]


@contextlib.contextmanager
def hooked_features(unet, names):
    """Outputs of the named attention modules (the attention block output after to_out), graph kept."""
    store, modules = {}, dict(unet.named_modules())
    hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out)) for n in names]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def nce_direct(ref, cur, patch_sizes, tau):
    """PatchNCE over *all* positions (no sampling): ``[1, h, w, C]`` maps."""
    total = 0.0
    for p in patch_sizes:
        r, c = ref.permute(0, 3, 1, 2), cur.permute(0, 3, 1, 2)
        k = (min(p, r.shape[2]), min(p, r.shape[3]))
        if k != (1, 1):
            r, c = F.avg_pool2d(r, k), F.avg_pool2d(c, k)
        r = F.normalize(r, dim=1).flatten(2)[0].t().detach()
        c = F.normalize(c, dim=1).flatten(2)[0].t()
        logits = r @ c.t()
        pos = logits.diagonal().unsqueeze(1)
        neg = logits.masked_fill(torch.eye(len(r), dtype=torch.bool), -10.0)
        out = torch.cat([pos, neg], dim=1) / tau
        total = total + F.cross_entropy(out, torch.zeros(len(r), dtype=torch.long))
    return total


def grid(features):
    side = int(math.isqrt(features.shape[1]))
    return features.reshape(1, side, side, -1)


# ----------------------------------------------------------------------------- SDS, DDS, SBP, PDS
def test_sds_gradient(backbone, z_src, z_cur):
    bb, d = backbone, draw(600)
    ed = Editor(bb, cfg_of("sds"), SRC, TGT, z_src)
    out = ed.method.step(z_cur, d, ed.ctx)
    t, eps = d.t, d.eps
    expected = guided(bb, noised(bb, z_cur, eps, t), t, TGT, 7.5) - eps
    torch.testing.assert_close(out.raw, expected, **TOL)


@pytest.mark.parametrize("weighting", ["none", "one_minus_alpha"])
def test_dds_gradient_one_batched_call(backbone, z_src, z_cur, weighting):
    bb, d = backbone, draw(400)
    ed = Editor(bb, cfg_of("dds", weighting=weighting), SRC, TGT, z_src)
    out = ed.method.step(z_cur, d, ed.ctx)
    t, eps = d.t, d.eps
    w = (1 - bb.alphas_cumprod[t]) if weighting == "one_minus_alpha" else 1.0
    expected = w * (guided(bb, noised(bb, z_cur, eps, t), t, TGT, 7.5) - guided(bb, noised(bb, z_src, eps, t), t, SRC, 7.5))
    torch.testing.assert_close(out.raw, expected, **TOL)
    assert ed.scorer.calls == 1 and ed.scorer.rows == 4  # [null, src, null, tgt] in one UNet call


def test_sbp_gradient_equals_cfg_difference(backbone, z_src, z_cur):
    bb, d = backbone, draw(700)
    ed = Editor(bb, cfg_of("sbp"), SRC, TGT, z_src)
    out = ed.method.step(z_cur, d, ed.ctx)
    t, eps = d.t, d.eps
    x = noised(bb, z_cur, eps, t)
    # SBP's formula with CFG on both branches; the null branches cancel, the method skips them
    expected = (1 - bb.alphas_cumprod[t]) * (guided(bb, x, t, TGT, 30.0) - guided(bb, x, t, SRC, 30.0))
    torch.testing.assert_close(out.raw, expected, rtol=1e-4, atol=1e-4)
    assert ed.scorer.rows == 2


def test_pds_gradient(backbone, z_src, z_cur):
    bb = backbone
    d = draw([601, 599], n_noise=2)
    ed = Editor(bb, cfg_of("pds", guidance=7.5), SRC, TGT, z_src)
    out = ed.method.step(z_cur, d, ed.ctx)
    t, tp = d.t[:1], d.t[1:]
    eps, eps2 = d.eps[:1], d.eps[1:]
    sched = bb.scheduler
    beta, alpha = float(sched.betas[601]), float(sched.alphas[601])
    at, ap = float(bb.alphas_cumprod[601]), float(bb.alphas_cumprod[599])

    def zeta(x0, prompt):
        xt = noised(bb, x0, eps, t)
        e = guided(bb, xt, t, prompt, 7.5)
        x0_hat = (xt - math.sqrt(1 - at) * e) / math.sqrt(at)
        mu = math.sqrt(ap) * beta / (1 - at) * x0_hat + math.sqrt(alpha) * (1 - ap) / (1 - at) * xt
        return (noised(bb, x0, eps2, tp) - mu) / math.sqrt((1 - ap) / (1 - at) * beta)

    torch.testing.assert_close(out.raw, zeta(z_cur, TGT) - zeta(z_src, SRC), rtol=1e-4, atol=1e-3)


def test_pds_timesteps_on_the_grid(backbone, z_src):
    ed = Editor(backbone, cfg_of("pds"), SRC, TGT, z_src)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, tp = ed.method.sample(gen, ed.ctx).t.tolist()
        assert t - tp == 2 and t % 2 == 1 and 21 <= t <= 979  # grid of 500, steps_offset 1, [0.02, 0.98)


@pytest.mark.parametrize("spacing, grid", [("trailing", 300), ("linspace", 500), ("leading", 300)])
def test_pds_grid_is_the_schedulers_own_timesteps_for_any_spacing(fresh, z_src, spacing, grid):
    """t and t' are neighbours among the timesteps a DDIM scheduler of that spacing visits (the old
    `idx * (T // grid) + steps_offset` formula matches "leading" only)."""
    from diffusers import DDIMScheduler

    bb = fresh
    bb.scheduler = DDIMScheduler.from_config(bb.scheduler.config, timestep_spacing=spacing)
    ed = Editor(bb, cfg_of("pds", pds_grid=grid), SRC, TGT, z_src)
    visits = DDIMScheduler.from_config(bb.scheduler.config)
    visits.set_timesteps(grid)
    ascending = sorted(int(t) for t in visits.timesteps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        t, tp = ed.method.sample(gen, ed.ctx).t.tolist()
        i = ascending.index(t)  # t is on the scheduler's grid ...
        assert i >= 1 and ascending[i - 1] == tp  # ... and t' is the step before it
    if spacing == "linspace":  # np.linspace(0, 999, 500).round(): even timesteps at the low end, not "leading"'s odd ones
        assert ascending[:3] == [0, 2, 4]


# ----------------------------------------------------------------------------- DDS-S / DDS-SM
class WeightSwapAdapter:
    """Hand-made adapter: the personalized model has a changed conv_in; `disabled` swaps the original back."""

    kind = "lora"

    def __init__(self, backbone):
        conv = backbone.unet.conv_in
        self.original = conv.weight.detach().clone()
        self.personal = self.original + 0.05 * torch.randn(self.original.shape, generator=torch.Generator().manual_seed(4))
        conv.weight.data.copy_(self.personal)

    @contextlib.contextmanager
    def disabled(self, backbone):
        backbone.unet.conv_in.weight.data.copy_(self.original)
        try:
            yield
        finally:
            backbone.unet.conv_in.weight.data.copy_(self.personal)


def test_dds_s_source_branch_on_pretrained_model(fresh, z_src, z_cur):
    bb = fresh
    adapter = WeightSwapAdapter(bb)
    bb.adapter = adapter
    d = draw(500)
    ed = Editor(bb, cfg_of("dds_s", subject_mask=None), SRC, TGT, z_src)
    out = ed.method.step(z_cur, d, ed.ctx)
    t, eps = d.t, d.eps
    personal = guided(bb, noised(bb, z_cur, eps, t), t, TGT, 7.5)
    with adapter.disabled(bb):
        pretrained = guided(bb, noised(bb, z_src, eps, t), t, SRC, 7.5)
    torch.testing.assert_close(out.raw, personal - pretrained, **TOL)
    assert ed.scorer.calls == 2  # one UNet call per adapter state, same UNet
    # and it differs from plain DDS on the personalized model
    plain = Editor(bb, cfg_of("dds"), SRC, TGT, z_src)
    assert (plain.method.step(z_cur, d, plain.ctx).raw - out.raw).abs().max() > 1e-4

    # DDS-SM: the same delta times the subject mask (explicit mask tensor)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:11, 5:13] = 1
    sm = Editor(bb, cfg_of("dds_sm"), SRC, TGT, z_src, subject_mask=mask)
    torch.testing.assert_close(sm.method.step(z_cur, d, sm.ctx).raw, mask * (personal - pretrained), **TOL)


def test_dds_sm_auto_mask_is_the_subject_mask(backbone, z_src):
    from dreamsteer.distill.subject_mask import subject_mask

    ed = Editor(backbone, cfg_of("dds_sm"), SRC, "a photo of a sks cat", z_src)
    expected = subject_mask(backbone, z_src, SRC, "cat", timesteps=(100, 300, 500), divisors=(2, 4)).mask
    torch.testing.assert_close(ed.ctx.subject_mask, expected)
    assert ed.output_mask() is not None
    # the target replaces a word describing the subject: the mask reads the replaced word with the noun
    source = "a photo of a gray cat"
    ed = Editor(backbone, cfg_of("dds_sm"), source, "a photo of a sks cat", z_src)
    both = subject_mask(backbone, z_src, source, "gray cat", timesteps=(100, 300, 500), divisors=(2, 4)).soft
    noun = subject_mask(backbone, z_src, source, "cat", timesteps=(100, 300, 500), divisors=(2, 4)).soft
    assert (both - noun).abs().max() > 1e-3  # so the check below tells the two apart
    torch.testing.assert_close(ed.ctx.subject_mask, (both >= 0.5).float())


# ----------------------------------------------------------------------------- CDS
def test_cds_gradient_dds_plus_patchnce(backbone, z_src, z_cur):
    bb, d = backbone, draw(450)
    cfg = cfg_of("cds", n_patches=100000)
    ed = Editor(bb, cfg, SRC, TGT, z_src)
    with ed.recorder:
        out = ed.method.step(z_cur, d, ed.ctx)
    t, eps = d.t, d.eps
    dds = guided(bb, noised(bb, z_cur, eps, t), t, TGT, 7.5) - guided(bb, noised(bb, z_src, eps, t), t, SRC, 7.5)
    names = up_self_layers(bb.unet)
    with hooked_features(bb.unet, names) as ref:
        eps_of(bb, noised(bb, z_src, eps, t), t, SRC)
    ref = {n: v.detach() for n, v in ref.items()}
    leaf = z_cur.clone().requires_grad_(True)
    with hooked_features(bb.unet, names) as cur:
        unet_eps(bb, noised(bb, leaf, eps, t), t, TGT)
        loss = sum(nce_direct(grid(ref[n]), grid(cur[n]), [1, 2], 0.07) for n in names)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(out.raw, cfg.w_dds * dds, **TOL)
    torch.testing.assert_close(out.extra, cfg.w_cut * grad, rtol=1e-3, atol=1e-5)
    assert out.extra.abs().max() > 0


# ----------------------------------------------------------------------------- LUSD
def attention_parts(bb, x, t, prompt, cross_names, self_names, columns):
    """Head-averaged softmax(QK^T * scale) from hooked to_q / to_k: cross columns and self maps."""
    modules = dict(bb.unet.named_modules())
    qk, hooks = {}, []
    for name in cross_names + self_names:
        for part in ("to_q", "to_k"):
            hooks.append(getattr(modules[name], part).register_forward_hook(
                lambda _m, _i, out, key=(name, part): qk.__setitem__(key, out.detach())))
    eps_of(bb, x, t, prompt)
    for h in hooks:
        h.remove()

    def probs(name):
        attn = modules[name]
        q, k = qk[(name, "to_q")], qk[(name, "to_k")]
        hd = q.shape[-1] // attn.heads
        q = q.reshape(1, -1, attn.heads, hd).transpose(1, 2)
        k = k.reshape(1, -1, attn.heads, hd).transpose(1, 2)
        return ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)[0]

    cross = torch.stack([probs(n)[:, columns].mean(-1) for n in cross_names]).mean(0)
    self_map = torch.stack([probs(n) for n in self_names]).mean(0)
    return cross, self_map


def test_lusd_gradient_mask_l2_and_normalization(backbone, z_src, z_cur):
    bb = backbone
    steps, k = 6, 3
    cfg = cfg_of("lusd", steps=steps)
    ed = Editor(bb, cfg, SRC, TGT, z_src)
    assert ed.tokens == ["hat"]  # prompt difference "wearing a hat" -> noun "hat"
    d0, d1 = draw(350, seed=11), draw(620, seed=12)
    with ed.recorder:
        out0 = ed.method.step(z_src, d0, ed.ctx, record=True)
        ed.mask_plugin.update(out0.capture, (16, 16))  # the map of the previous accepted step
        out1 = ed.method.step(z_cur, d1, ed.ctx, record=True)
    grad, info = ed.gradient(z_cur, k, out1)

    # direct: mask from the target branch of the step-0 call (cross at latent/4, self at latent/2, all places):
    # SD's blocks at latent/4 are down 2 / up 1 and at latent/2 down 1 / up 2 (its mid block is at latent/8);
    # SDXL's (3 levels) down 2 / mid / up 0 at latent/4 and down 1 / up 1 at latent/2
    at_4, at_2 = (("down_blocks.2.", "mid_block.", "up_blocks.0."), ("down_blocks.1.", "up_blocks.1.")) if bb.family.name == "sdxl" else \
        (("down_blocks.2.", "up_blocks.1."), ("down_blocks.1.", "up_blocks.2."))
    cross_names = [n for n in dict(bb.unet.named_modules()) if n.endswith("attn2") and n.startswith(at_4)]
    self_names = [n for n in dict(bb.unet.named_modules()) if n.endswith("attn1") and n.startswith(at_2)]
    ids = bb.tokenizer(TGT).input_ids
    columns = [ids.index(bb.tokenizer.convert_tokens_to_ids("hat</w>"))]  # column 8 (BOS at 0)
    cross, a_s = attention_parts(bb, noised(bb, z_src, d0.eps, d0.t), d0.t, TGT, cross_names, self_names, columns)
    a = F.interpolate(cross.reshape(1, 1, 4, 4), size=(8, 8), mode="bicubic", align_corners=False).reshape(64, 1)
    refined = F.interpolate((a_s @ a).reshape(1, 1, 8, 8), size=(16, 16), mode="bicubic", align_corners=False)
    m = (refined - refined.min()) / (refined.max() - refined.min())
    c = k / (steps - 1)
    m_hat = c * m + (1 - c)
    x = noised(bb, z_cur, d1.eps, d1.t)
    e = eps_of(bb, x, d1.t, TGT) - eps_of(bb, x, d1.t, SRC)
    direction = (1 - 0.02) * m_hat * e + 0.02 * (z_cur - z_src)
    s = -5 + 10 * k / (steps - 1)
    gamma = 0.01 + (0.15 - 0.01) * (1 - 1 / (1 + math.exp(-s)))
    expected = 2000 / 4096 * gamma * direction / direction.std()
    torch.testing.assert_close(ed.mask_plugin.mask, m, rtol=1e-3, atol=5e-4)  # min-max scaling amplifies float noise
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=2e-5)
    assert info["gamma"] == pytest.approx(gamma)


def test_lusd_ema_mask_and_filter(backbone, z_src, z_cur):
    bb = backbone
    ed = Editor(bb, cfg_of("lusd", steps=4, filter_eta0=1e6, filter_max_tries=3), SRC, TGT, z_src)
    with ed.recorder:
        out_a = ed.method.step(z_src, draw(300, seed=1), ed.ctx, record=True)
        out_b = ed.method.step(z_cur, draw(800, seed=2), ed.ctx, record=True)
        ed.mask_plugin.update(out_a.capture, (16, 16))
        first = ed.mask_plugin.mask.clone()
        ed.mask_plugin.update(out_b.capture, (16, 16))
        second = ed.mask_plugin.__class__(ed.layers["cross"], ed.layers["qk"], 0.1)
        second.update(out_b.capture, (16, 16))
        torch.testing.assert_close(ed.mask_plugin.mask, 0.9 * first + 0.1 * second.mask)

        # filtering: a threshold no delta reaches -> 3 rejections, then the 4th draw (same t, new noise) is used
        gen = torch.Generator().manual_seed(5)
        out, record = ed.evaluate(z_cur, gen, None)
        assert record["rejected"] == 3
        replay = torch.Generator().manual_seed(5)
        d = ed.method.sample(replay, ed.ctx)
        for _ in range(3):
            d = ed.method.resample(d, replay, ed.ctx, None, resample_t=False)
        assert record["t"] == d.t.tolist()
        torch.testing.assert_close(out.raw, ed.method.step(z_cur, d, ed.ctx).raw)


def test_filter_threshold_decays_per_rejection_and_resets():
    from dreamsteer.distill.regularizers import GradientFilter

    f = GradientFilter(eta0=1.0, decay=0.5, max_tries=10)
    weak = torch.tensor([0.0, 0.6])  # std 0.424
    assert not f.accept(weak) and f.eta == 0.5
    assert not f.accept(weak) and f.eta == 0.25
    assert f.accept(weak) and f.eta == 0.25
    f.reset()
    assert f.eta == 1.0
