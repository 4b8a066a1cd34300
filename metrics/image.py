"""Pixel-space metrics between two images: L1, SSIM and MS-SSIM, in plain torch.

Images are float tensors [N, 3, H, W] in [0, 1] (`pil_to_unit`); every function returns one value
per image pair ([N]). SSIM and MS-SSIM follow Wang et al.'s reference code: local statistics over
the *valid* region of an 11x11 Gaussian window, as scikit-image's `structural_similarity(
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` computes (checked in the tests).
torchmetrics instead pads the image by reflection and averages the border positions too, which
gives slightly different numbers; it is not used (nor needed) here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Wang, Simoncelli & Bovik 2003, Table 1: the weight of each of the 5 scales (finest first).
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def pil_to_unit(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [1, 3, H, W] in [0, 1] (what torchvision's ToTensor gives)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"image metrics need two [N, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def l1_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 = mean_{c,h,w} |x - y| with pixels in [0, 1].

    LUSD (and MagicBrush before it) report `nn.L1Loss()` between ToTensor images, i.e. this mean
    absolute difference; identical images give 0, black vs white gives 1.
    """
    _check_pair(x, y)
    return (x - y).abs().flatten(1).mean(1)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalized 1-D Gaussian g[i] ∝ exp(-(i - (size-1)/2)^2 / (2 sigma^2)) of SSIM."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _band(n: int, window: torch.Tensor) -> torch.Tensor:
    """[n - k + 1, n] matrix whose rows slide `window`: A @ v is the 'valid' correlation of v with it."""
    k = window.numel()
    band = torch.zeros(n - k + 1, n, dtype=window.dtype)
    for i in range(n - k + 1):
        band[i, i : i + k] = window
    return band


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel over the 'valid' region (no padding): A_h @ x @ A_w^T.

    Two matrix products instead of depthwise convolutions: several times faster on a CPU.
    """
    h, w = x.shape[-2:]
    rows = _band(h, window).to(x.device, x.dtype)
    cols = _band(w, window).to(x.device, x.dtype)
    return rows @ x @ cols.T


def _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and mean contrast-structure term cs over channels and valid pixels."""
    if min(x.shape[-2:]) < kernel_size:
        raise ValueError(f"SSIM needs images of at least {kernel_size}x{kernel_size} px, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    window = gaussian_window(kernel_size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM (Wang et al. 2004): mean over channels and window positions of

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

    with local statistics under an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2,
    C2 = (0.03 L)^2, L = `data_range`, over the valid region. Identical images give 1.
    """
    _check_pair(x, y)
    return _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2)[0].float()


def ms_ssim_min_size(scales: int = 5, kernel_size: int = 11) -> int:
    """The smallest image side MS-SSIM with `scales` scales accepts: the coarsest scale must hold a window."""
    return kernel_size * 2 ** (scales - 1)


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    scales: int = 5,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """MS-SSIM (Wang, Simoncelli & Bovik 2003):

        MS-SSIM = l_M^{beta_M} * prod_{j=1..M} cs_j^{beta_j}

    where cs_j is the mean contrast-structure term at scale j (the image average-pooled by 2
    between scales), l_M * cs_M is the SSIM at the coarsest scale, and beta are the paper's
    weights (the first `scales` of them, renormalized to sum to 1 when fewer than 5 are used).
    Negative terms are clipped to 0 before the powers (a fractional power of a negative number is
    undefined), as torchmetrics and pytorch-msssim do. Identical images give 1.
    """
    _check_pair(x, y)
    if not 1 <= scales <= len(MS_SSIM_BETAS):
        raise ValueError(f"MS-SSIM scales must be in 1..{len(MS_SSIM_BETAS)}, got {scales}")
    need = ms_ssim_min_size(scales, kernel_size)
    if min(x.shape[-2:]) < need:
        raise ValueError(
            f"MS-SSIM with {scales} scales needs images of at least {need} px per side, got {tuple(x.shape[-2:])}"
        )
    betas = torch.tensor(MS_SSIM_BETAS[:scales], dtype=torch.float64)
    if scales < len(MS_SSIM_BETAS):
        betas = betas / betas.sum()
    terms = []
    for j in range(scales):
        sim, cs = _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2)
        terms.append(sim if j == scales - 1 else cs)
        if j < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.relu(torch.stack(terms))  # [scales, N]
    return torch.prod(stacked ** betas.to(stacked.device)[:, None], dim=0).float()
