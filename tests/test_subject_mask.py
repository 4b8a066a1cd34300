"""The subject mask equals a direct computation from the attention of a plain UNet call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreamsteer.distill.subject_mask import subject_mask, token_positions

PROMPT = "a photo of a cat next to a mirror"


def _direct_mask(bb, z_src, prompt, column, timesteps, seed, threshold, dilation):
    """Hook to_q / to_k of the decoder cross-attention at 8x8 and 4x4 (latent/2, latent/4), run the UNet
    with its own processors, and compute softmax(QK^T/sqrt(d)) by hand."""
    names = [n for n, m in bb.unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn2")]
    captured: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    modules = dict(bb.unet.named_modules())
    for name in names:
        captured[name] = {}
        for part in ("to_q", "to_k"):
            def hook(_m, _inp, out, name=name, part=part):
                captured[name][part] = out.detach()

            hooks.append(getattr(modules[name], part).register_forward_hook(hook))
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(z_src.shape, generator=gen)
    t = torch.tensor(timesteps)
    a = bb.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    z_t = a.sqrt() * z_src + (1 - a).sqrt() * eps
    with torch.no_grad():
        emb = bb.encode_prompt([prompt]).expand(len(t), -1, -1)
        bb.unet(z_t, t, encoder_hidden_states=emb)
    for h in hooks:
        h.remove()

    maps = []
    for name in names:
        attn = modules[name]
        q, k = captured[name]["to_q"], captured[name]["to_k"]
        b, hw, c = q.shape
        q = q.reshape(b, hw, attn.heads, c // attn.heads).permute(0, 2, 1, 3)
        k = k.reshape(b, -1, attn.heads, c // attn.heads).permute(0, 2, 1, 3)
        probs = torch.softmax(q @ k.transpose(-1, -2) / (c // attn.heads) ** 0.5, dim=-1)
        side = int(hw**0.5)
        if side not in (8, 4):  # latent 16: divisors 2 and 4
            continue
        m = probs[..., column].mean(dim=1).reshape(b, 1, side, side)
        maps.append(F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False))
    assert len(maps) == 4  # two CA layers per decoder block at 8x8 and 4x4 in the tiny model
    avg = torch.stack(maps).mean(dim=(0, 1))
    soft = (avg - avg.min()) / (avg.max() - avg.min())
    mask = (soft >= threshold).float()
    if dilation:
        mask = F.max_pool2d(mask[None], 2 * dilation + 1, stride=1, padding=dilation)[0]
    return mask[None], soft[None]


@pytest.mark.parametrize("dilation", [0, 1])
def test_mask_equals_direct_computation_from_attention(tiny_backbone, dilation):
    bb = tiny_backbone
    z_src = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    column = token_positions(bb.tokenizer, PROMPT, "cat")
    assert column == [5]  # BOS a photo of a cat
    result = subject_mask(bb, z_src, PROMPT, "cat", timesteps=(200, 500), threshold=0.6, dilation=dilation, seed=7)
    mask, soft = _direct_mask(bb, z_src, PROMPT, 5, [200, 500], 7, 0.6, dilation)
    torch.testing.assert_close(result.soft, soft, rtol=1e-4, atol=1e-5)
    assert result.mask.shape == (1, 1, 16, 16)
    assert set(result.mask.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(result.mask, mask)
    assert 0 < result.mask.sum() < 256  # a real partition at this threshold


def test_mask_depends_on_the_token_and_bad_input_fails_before_compute(tiny_backbone):
    bb = tiny_backbone
    z_src = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cat = subject_mask(bb, z_src, PROMPT, "cat")
    mirror = subject_mask(bb, z_src, PROMPT, "mirror")
    assert not torch.equal(cat.soft, mirror.soft)
    with pytest.raises(ValueError, match="'dog' does not occur"):
        subject_mask(bb, z_src, PROMPT, "dog")
    with pytest.raises(ValueError, match="threshold"):
        subject_mask(bb, z_src, PROMPT, "cat", threshold=1.5)
    with pytest.raises(ValueError, match="timesteps"):
        subject_mask(bb, z_src, PROMPT, "cat", timesteps=(1000,))
