"""Each metric against a hand computation on small inputs (or an independent reference implementation)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreamsteer.metrics import curves
from dreamsteer.metrics.clip import (
    ClipEmbedder,
    ModelUnavailableError,
    build_tiny_clip,
    clip_i,
    clip_i_concept,
    clip_r,
    clip_score,
    clip_t,
    masked_clip_score,
    masked_region,
)
from dreamsteer.metrics.image import MS_SSIM_BETAS, l1_distance, ms_ssim, ms_ssim_min_size, pil_to_unit, ssim
from dreamsteer.metrics.lpips import LPIPS, LPIPSWeightsError, convert_lpips_weights, load_lpips


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return ClipEmbedder.load(str(tiny_clip_dir))


def _images(seed: int, n: int = 2, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


# ---------------------------------------------------------------- pixel metrics


def test_l1_extremes_and_hand_value():
    x = torch.zeros(1, 3, 2, 2)
    assert float(l1_distance(x, x)[0]) == 0.0
    assert float(l1_distance(x, torch.ones_like(x))[0]) == 1.0
    y = x.clone()
    y[0, 0, 0, 0], y[0, 2, 1, 1] = 0.6, 0.3  # |diff| sums to 0.9 over 12 values
    assert float(l1_distance(x, y)[0]) == pytest.approx(0.9 / 12)
    img = Image.fromarray(np.full((4, 4, 3), 255, np.uint8))
    assert torch.equal(pil_to_unit(img), torch.ones(1, 3, 4, 4))


def test_ssim_matches_scikit_image_and_identical_is_one():
    from skimage.metrics import structural_similarity

    x, y = _images(0)
    ours = ssim(x, y)
    for i in range(2):
        ref = structural_similarity(
            x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(),
            channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        )  # fmt: skip
        assert float(ours[i]) == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert float(ours.max()) < 0.99


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # zero variances: the structure term is 1
    assert float(ssim(x, y)[0]) == pytest.approx(expected, rel=1e-5)


def test_ms_ssim_two_scales_by_hand():
    x, y = _images(1, n=1, size=48)
    c2 = (0.03 * 1.0) ** 2
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    g = torch.tensor(g / g.sum(), dtype=torch.float64)
    kernel = (g[:, None] * g[None, :]).view(1, 1, 11, 11).repeat(3, 1, 1, 1)

    def blur(t):
        return F.conv2d(t.double(), kernel, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    cs1 = float(((2 * cov + c2) / (vx + vy + c2)).mean())
    ssim2 = float(ssim(F.avg_pool2d(x, 2), F.avg_pool2d(y, 2))[0])
    b1, b2 = MS_SSIM_BETAS[0] / sum(MS_SSIM_BETAS[:2]), MS_SSIM_BETAS[1] / sum(MS_SSIM_BETAS[:2])
    assert float(ms_ssim(x, y, scales=2)[0]) == pytest.approx(cs1**b1 * ssim2**b2, rel=1e-5)


def test_ms_ssim_extremes_constant_images_and_size_check():
    x, y = _images(2, n=1, size=ms_ssim_min_size(5))
    assert ms_ssim_min_size(5) == 176 and ms_ssim_min_size(4) == 88
    assert float(ms_ssim(x, x)[0]) == pytest.approx(1.0)
    assert float(ms_ssim(x, y, scales=1)[0]) == pytest.approx(float(ssim(x, y)[0]), rel=1e-6)
    a, b = 0.3, 0.5  # constant images: every cs is 1, so MS-SSIM = luminance ** beta_5
    c1 = 0.01**2
    lum = (2 * a * b + c1) / (a * a + b * b + c1)
    flat = ms_ssim(torch.full((1, 3, 176, 176), a), torch.full((1, 3, 176, 176), b))
    assert float(flat[0]) == pytest.approx(lum ** MS_SSIM_BETAS[4], rel=1e-5)
    with pytest.raises(ValueError, match="at least 176 px"):
        ms_ssim(x[..., :128, :128], y[..., :128, :128])


# ---------------------------------------------------------------- curves (LUSD)


def test_threshold_grid_is_lusds():
    grid = curves.clip_r_thresholds()
    assert grid == [1 + 0.01 * k for k in range(41)]
    assert len(curves.clip_r_thresholds(1.22)) == 23


def test_simpson_matches_scipy_and_is_exact_for_cubics():
    from scipy.integrate import simpson as scipy_simpson

    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 7, 22, 23, 41):
        x = curves.clip_r_thresholds(1 + 0.01 * (n - 1))
        y = list(rng.random(n))
        assert curves.simpson(y, x) == pytest.approx(float(scipy_simpson(y, x=x)), rel=1e-12)
    x = curves.clip_r_thresholds(1.22)
    cubic = [(k - 1) ** 3 - 2 * (k - 1) for k in x]
    assert curves.simpson(cubic, x) == pytest.approx(0.22**4 / 4 - 0.22**2, rel=1e-10)


def test_clip_auc_on_a_known_step_curve():
    # 4 finished edits + 1 failed job: successes = #(CLIP-R > k) / 5.
    clip_r_values = [0.9, 1.055, 1.155, 1.5]
    grid = curves.clip_r_thresholds()
    counts = [3] * 6 + [2] * 10 + [1] * 25  # k = 1.00..1.05 | 1.06..1.15 | 1.16..1.40
    assert curves.success_rate_curve(clip_r_values, grid, total=5) == [c / 5 for c in counts]
    h = 0.01
    weights = [1] + [4 if i % 2 else 2 for i in range(1, 40)] + [1]
    by_hand = h / 3 * sum(w * c / 5 for w, c in zip(weights, counts))
    result = curves.clip_auc(clip_r_values, grid, total=5)
    assert result.value == pytest.approx(by_hand, rel=1e-12)
    assert result.value == pytest.approx((0.055 * 3 + 0.10 * 2 + 0.245 * 1) / 5, abs=0.002)  # the step area
    assert curves.clip_auc([2.0] * 3, grid).value == pytest.approx(0.40)
    assert curves.clip_auc([1.0] * 3, grid).value == 0.0  # unchanged edits never pass: CLIP-R > k is strict
    assert curves.clip_auc([None, 1.5], grid).value == pytest.approx(0.20)  # undefined CLIP-R counts as a failure


def test_l1_star_and_clip_i_star():
    grid = curves.clip_r_thresholds()
    star = curves.conditional_area([1.5, 1.5, 0.8], [0.1, 0.3, 5.0], grid, k_max=1.22, min_examples=2)
    assert star.value == pytest.approx(0.2 * 0.22) and star.min_count == 2 and star.warning is None
    # means change where the weaker edit drops out: 0.2 for k < 1.1, 0.3 above
    means, counts = curves.conditional_mean_curve([1.1, 1.5], [0.1, 0.3], grid[:23])
    assert means[:10] == [pytest.approx(0.2)] * 10 and means[10:] == [pytest.approx(0.3)] * 13
    assert counts[9:11] == [2, 1]
    few = curves.conditional_area([1.1, 1.5], [0.1, 0.3], grid, min_examples=30)
    assert few.value == pytest.approx(curves.simpson(means, grid[:23])) and "30" in few.warning
    none = curves.conditional_area([1.05, 1.1], [0.1, 0.3], grid, name="L1*")
    assert none.value is None and "CLIP-R > 1.10" in none.reason


# ---------------------------------------------------------------- LPIPS


def _random_lpips(net: str = "alex", seed: int = 0) -> LPIPS:
    torch.manual_seed(seed)
    model = LPIPS(net)
    for i in range(5):  # real heads are non-negative (lpips clamps them in training)
        head = getattr(model, f"lin{i}").model[0]
        head.weight.data.abs_()
    return model


def test_lpips_identical_is_zero_and_matches_the_formula_by_hand():
    model = _random_lpips()
    x, y = _images(3, n=2, size=64)
    x, y = x * 2 - 1, y * 2 - 1
    assert torch.equal(model(x, x), torch.zeros(2))
    state = model.state_dict()
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(img):
        h = (img - shift) / scale
        taps = []
        conv = lambda h, i, stride, pad: F.relu(F.conv2d(h, state[f"net.slice{s}.{i}.weight"], state[f"net.slice{s}.{i}.bias"], stride, pad))  # noqa: E731
        s = 1; h = conv(h, 0, 4, 2); taps.append(h)  # noqa: E702
        s = 2; h = conv(F.max_pool2d(h, 3, 2), 3, 1, 2); taps.append(h)  # noqa: E702
        s = 3; h = conv(F.max_pool2d(h, 3, 2), 6, 1, 1); taps.append(h)  # noqa: E702
        s = 4; h = conv(h, 8, 1, 1); taps.append(h)  # noqa: E702
        s = 5; h = conv(h, 10, 1, 1); taps.append(h)  # noqa: E702
        return taps

    expected = torch.zeros(2)
    for level, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = state[f"lin{level}.model.1.weight"].view(1, -1, 1, 1)
        expected += ((a - b) ** 2 * w).sum(1).mean((1, 2))
    assert torch.allclose(model(x, y), expected, rtol=1e-5)
    assert float(model(x, y).min()) > 0
    assert torch.allclose(model(x, y), model(y, x))


def test_lpips_loads_lpips_package_layout_and_converts_torchvision_weights(tmp_path):
    from safetensors.torch import save_file

    model = _random_lpips(seed=1)
    state = model.state_dict()
    x, y = _images(4, n=1, size=64)
    # 1. a file saved from lpips.LPIPS(...).state_dict() (same names), without metadata
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "full.safetensors"))
    loaded = load_lpips(tmp_path / "full.safetensors")
    assert loaded.net_name == "alex" and torch.equal(loaded(x, y), model(x, y))
    # 2. torchvision's `features.<i>.*` checkpoint + lpips' head file, converted
    backbone = {k.replace(f"net.slice{k.split('.')[1][-1]}.", "features."): v for k, v in state.items() if k.startswith("net.")}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # ignored
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    torch.save(backbone, tmp_path / "alexnet-owt.pth")
    torch.save(heads, tmp_path / "alex.pth")
    out = convert_lpips_weights(tmp_path / "alexnet-owt.pth", tmp_path / "alex.pth", tmp_path / "lpips_alex.safetensors", "alex")
    assert torch.equal(load_lpips(out)(x, y), model(x, y))
    assert not list(tmp_path.glob("*.tmp*"))
    # 3. clear errors
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lpips(tmp_path / "nope.safetensors")
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("lin3")}, str(tmp_path / "partial.safetensors"), metadata={"net": "alex"})
    with pytest.raises(LPIPSWeightsError, match="lin3.model.1.weight"):
        load_lpips(tmp_path / "partial.safetensors")


def test_lpips_vgg_layout_follows_torchvision_indices():
    names = [k for k in LPIPS("vgg").state_dict() if k.endswith(".weight") and k.startswith("net.")]
    assert names[0] == "net.slice1.0.weight" and names[-1] == "net.slice5.28.weight" and len(names) == 13


# ---------------------------------------------------------------- CLIP / DINO


def test_clip_metrics_by_hand():
    a, b, t = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8]), torch.tensor([0.0, 2.0])
    assert clip_t(b, t) == pytest.approx(0.8)
    assert clip_i(a, b) == pytest.approx(0.6)
    assert clip_r(b, a, t) is None  # cos(source, text) = 0: the ratio is undefined
    assert clip_r(b, torch.tensor([0.8, 0.6]), t) == pytest.approx(0.8 / 0.6)
    assert clip_i_concept(a, torch.stack([a, b, -a])) == pytest.approx((1 + 0.6 - 1) / 3)
    assert clip_score(b, t) == pytest.approx(80.0) and clip_score(-b, t) == 0.0
    assert masked_clip_score(torch.stack([b, a]), torch.stack([t, t])) == pytest.approx(40.0)


def test_masked_region_crops_the_box_and_blacks_out_the_rest():
    img = Image.fromarray(np.full((8, 10, 3), 200, np.uint8))
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    mask[2, 3] = False
    crop = np.asarray(masked_region(img, mask))
    assert crop.shape == (3, 4, 3) and crop[0, 0].tolist() == [0, 0, 0] and crop[1, 1].tolist() == [200] * 3
    with pytest.raises(ValueError, match="empty"):
        masked_region(img, np.zeros((8, 10), bool))


def test_tiny_clip_embeddings_match_transformers(clip, tiny_clip_dir):
    from transformers import CLIPModel

    from dreamsteer.data.samples import sample_photo

    photo = sample_photo("cat")
    images = [photo, photo.rotate(90)]
    prompts = ["a photo of a cat", "a dog wearing a red hat"]
    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    with torch.no_grad():
        pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels)
        tokens = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tokens)
    img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
    txt = getattr(txt, "pooler_output", txt)
    assert pixels.shape == (2, 3, 32, 32)
    assert torch.allclose(clip.images(images), F.normalize(img, dim=-1), atol=1e-6)
    assert torch.allclose(clip.texts(prompts), F.normalize(txt, dim=-1), atol=1e-6)
    e = clip.images([photo, photo])
    t = clip.texts(["a photo of a cat"])[0]
    assert clip_i(e[0], e[1]) == pytest.approx(1.0)
    if clip_r(e[0], e[1], t) is not None:
        assert clip_r(e[0], e[1], t) == pytest.approx(1.0)  # an unchanged image has CLIP-R exactly 1
    negated = clip.texts(["a photo of a cat"])  # the same prompt always embeds the same
    assert torch.equal(negated[0], t)


def test_tiny_clip_is_deterministic_and_missing_models_are_unavailable(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny_clip(tmp_path / "again", seed=0)
    a, b = load_file(str(tiny_clip_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert build_tiny_clip(again, seed=0) == again  # an existing folder is reused
    with pytest.raises(ModelUnavailableError, match="folder not found"):
        ClipEmbedder.load(str(tmp_path / "no-clip"))
    with pytest.raises(ModelUnavailableError, match="cannot be loaded"):
        ClipEmbedder.load(str(tmp_path))  # a folder without a model


def test_dino_embeddings_are_the_cls_token(tmp_path):
    from transformers import ViTConfig, ViTModel

    from dreamsteer.metrics.dino import IMAGENET_MEAN, DinoEmbedder

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path / "dino"))
    dino = DinoEmbedder.load(str(tmp_path / "dino"))
    flat = Image.fromarray(np.full((40, 60, 3), [124, 116, 104], np.uint8))  # ~ ImageNet mean colour
    pixels = dino.preprocess(flat)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, torch.tensor([(c / 255 - m) / s for c, m, s in zip((124, 116, 104), IMAGENET_MEAN, (0.229, 0.224, 0.225))]).view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    from dreamsteer.data.samples import sample_photo

    photo = sample_photo("coffee")
    e = dino.images([photo, photo, photo.rotate(180)])
    with torch.no_grad():
        cls = dino.model(pixel_values=dino.preprocess(photo)[None]).last_hidden_state[0, 0]
    assert torch.allclose(e[0], F.normalize(cls, dim=0), atol=1e-6)
    assert float(e[0] @ e[1]) == pytest.approx(1.0) and float(e[0] @ e[2]) < 1.0 - 1e-6
    assert math.isclose(float(e[0].norm()), 1.0, rel_tol=1e-6)
