"""Batched scoring equals per-request UNet calls; adapter-state grouping; SDPA A_S @ a == materialized."""
from __future__ import annotations

import contextlib

import pytest
import torch

from dreamsteer.distill.attention import AttentionRecorder, attention_apply, list_attention_layers, select_layers
from dreamsteer.distill.scorer import ScoreRequest, Scorer


def _requests(bb, n=5, pretrained=lambda i: False, record=lambda i: False):
    gen = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "", "a dog", "a cat wearing a hat", "a red car"]
    out = []
    for i in range(n):
        z = torch.randn((1, 4, 16, 16), generator=gen)
        t = torch.tensor(100 + 150 * i)
        out.append(ScoreRequest(z, t, bb.encode_prompt([prompts[i % len(prompts)]]), pretrained(i), record(i)))
    return out


def _direct(bb, r):
    with torch.no_grad():
        return bb.unet(r.latent, r.t.reshape(1), encoder_hidden_states=r.emb).sample


def test_batched_scoring_equals_per_request_calls(tiny_backbone):
    bb = tiny_backbone
    requests = _requests(bb)
    scorer = Scorer(bb, max_batch=3)
    with torch.no_grad():
        scores = scorer(requests)
    assert scorer.calls == 2 and scorer.rows == 5  # chunks of 3 + 2
    for r, eps in zip(requests, scores.eps):
        torch.testing.assert_close(eps, _direct(bb, r), rtol=1e-5, atol=1e-5)


class _SwapAdapter:
    def __init__(self, bb, kind="lora"):
        self.kind = kind
        self.base = bb.unet.conv_out.bias.detach().clone()
        self.personal = self.base + 0.5
        bb.unet.conv_out.bias.data.copy_(self.personal)
        self.entered = 0

    @contextlib.contextmanager
    def disabled(self, bb):
        self.entered += 1
        bb.unet.conv_out.bias.data.copy_(self.base)
        try:
            yield
        finally:
            bb.unet.conv_out.bias.data.copy_(self.personal)


def test_requests_grouped_by_adapter_state(fresh_backbone):
    bb = fresh_backbone
    adapter = _SwapAdapter(bb)
    bb.adapter = adapter
    requests = _requests(bb, pretrained=lambda i: i % 2 == 1)
    scorer = Scorer(bb, max_batch=8)
    with torch.no_grad():
        scores = scorer(requests)
    assert scorer.calls == 2 and adapter.entered == 1  # personalized rows in one call, pre-trained rows in one
    for r, eps in zip(requests, scores.eps):
        with adapter.disabled(bb) if r.pretrained else contextlib.nullcontext():
            torch.testing.assert_close(eps, _direct(bb, r), rtol=1e-5, atol=1e-5)
    # Textual Inversion leaves the UNet alone: all rows share one call
    adapter.kind = "textual_inversion"
    scorer = Scorer(bb, max_batch=8)
    with torch.no_grad():
        scorer(requests)
    assert scorer.calls == 1


def test_capture_keeps_only_the_recorded_rows(tiny_backbone):
    bb = tiny_backbone
    layers = list_attention_layers(bb.unet)
    cross = select_layers(layers, "cross", ("up",), (4,))
    requests = _requests(bb, record=lambda i: i == 3)
    with AttentionRecorder(bb.unet, cross=cross) as rec:
        rec.token_indices = [2]
        scorer = Scorer(bb, max_batch=2, recorder=rec)
        with torch.no_grad():
            scores = scorer(requests)
        assert set(scores.captures) == {3}
        alone = Scorer(bb, max_batch=1, recorder=rec)
        with torch.no_grad():
            single = alone([requests[3]])
    for name in scores.captures[3].cross_maps:
        torch.testing.assert_close(scores.captures[3].cross_maps[name], single.captures[0].cross_maps[name], rtol=1e-5, atol=1e-6)
        assert scores.captures[3].cross_maps[name].shape[0] == 1


@pytest.mark.parametrize("divisor", [1, 2])
def test_sdpa_product_equals_materialized_attention(tiny_backbone, divisor):
    """``A_S @ a`` by SDPA from recorded q, k (no HW x HW map) equals ``mean_h softmax(QK^T/sqrt d) @ a``."""
    bb = tiny_backbone
    self_layers = select_layers(list_attention_layers(bb.unet), "self", ("down", "up"), (divisor,))
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    with AttentionRecorder(bb.unet, queries_keys=self_layers, keep_maps=True) as rec, torch.no_grad():
        bb.predict_eps(z, torch.tensor(400), bb.encode_prompt(["a cat", "a dog"]))
    side = 16 // divisor
    a = torch.rand((2, side * side, 1), generator=torch.Generator().manual_seed(4))
    for layer in self_layers:
        q, k, scale = rec.qk[layer.name]
        materialized = rec.maps[layer.name] @ a  # [B, HW, HW] @ [B, HW, 1]
        torch.testing.assert_close(attention_apply(q, k, a, scale), materialized, rtol=1e-5, atol=1e-6)
        assert rec.maps[layer.name].shape == (2, side * side, side * side)
    # without keep_maps no map is kept
    with AttentionRecorder(bb.unet, queries_keys=self_layers) as rec, torch.no_grad():
        bb.predict_eps(z, torch.tensor(400), bb.encode_prompt(["a cat", "a dog"]))
    assert not rec.maps and set(rec.qk) == {l.name for l in self_layers}


def test_lusd_mask_same_with_sdpa_or_maps(tiny_backbone):
    from dreamsteer.distill.regularizers import attention_map
    from dreamsteer.distill.scorer import Capture

    bb = tiny_backbone
    layers = list_attention_layers(bb.unet)
    cross = select_layers(layers, "cross", ("down", "mid", "up"), (4,))
    selfs = select_layers(layers, "self", ("down", "mid", "up"), (2,))
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    with AttentionRecorder(bb.unet, cross=cross, queries_keys=selfs, keep_maps=True) as rec, torch.no_grad():
        rec.token_indices = [5, 8]
        bb.predict_eps(z, torch.tensor(300), bb.encode_prompt(["a photo of a cat wearing a hat"]))
        cap = Capture(dict(rec.cross_maps), {}, dict(rec.qk), dict(rec.maps))
    sdpa = attention_map(cap, cross, selfs, (16, 16), use_maps=False)
    maps = attention_map(cap, cross, selfs, (16, 16), use_maps=True)
    torch.testing.assert_close(sdpa, maps, rtol=1e-3, atol=5e-4)  # min-max scaling amplifies float noise
    assert float(sdpa.min()) == 0.0 and float(sdpa.max()) == pytest.approx(1.0)
