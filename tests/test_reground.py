"""ReGround over GLIGEN on the tiny gated model: the block formula, the wirings, scheduled sampling, errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from dreamsteer.diffusion.backbone import ModelLoadError, load_backbone, resolve_model_source
from dreamsteer.diffusion.gligen import (
    MAX_OBJECTS,
    LayoutError,
    NotGligenError,
    box_from_mask,
    gated_blocks,
    grounding_inputs,
    set_fuser,
    tiny_gligen_dir,
    validate_layout,
)
from dreamsteer.diffusion.reground import apply_wiring, current_wiring, grounded_sample, remove_wiring, wired
from dreamsteer.diffusion.schedulers import make_scheduler

PROMPT = "a photo of a cat and a dog on the grass"
PHRASES = ["a cat", "a dog"]
BOXES = [[0.05, 0.3, 0.45, 0.9], [0.55, 0.1, 0.95, 0.6]]


@pytest.fixture(scope="module")
def gligen_module_backbone():
    backbone = load_backbone("tiny-gligen")
    # Non-zero gates of different sizes per block and per branch, so every GSA term matters.
    with torch.no_grad():
        for i, (_, block) in enumerate(gated_blocks(backbone.unet)):
            block.fuser.alpha_attn.fill_(0.4 + 0.1 * i)
            block.fuser.alpha_dense.fill_(-0.8 + 0.05 * i)
    return backbone


@pytest.fixture
def gligen(gligen_module_backbone):
    """The module's GLIGEN backbone, put back to sequential wiring with fusers on after each test."""
    yield gligen_module_backbone
    remove_wiring(gligen_module_backbone.unet)
    set_fuser(gligen_module_backbone.unet, True)


def _unet_inputs(backbone, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([700] * batch)
    with torch.no_grad():
        emb = backbone.encode_prompt([PROMPT] * batch)
        gl = grounding_inputs(backbone, PHRASES, BOXES, batch)
    return z, t, emb, gl


def _eps(unet, z, t, emb, gl=None) -> torch.Tensor:
    with torch.no_grad():
        return unet(z, t, encoder_hidden_states=emb, cross_attention_kwargs=None if gl is None else {"gligen": gl}).sample


def _block_inputs(backbone, z, t, emb, gl) -> dict[str, tuple]:
    """The (hidden_states, kwargs) each gated block receives inside one grounded UNet call."""
    seen: dict[str, tuple] = {}
    handles = [
        block.register_forward_pre_hook(lambda m, a, k, name=name: seen.__setitem__(name, (a[0].clone(), k)), with_kwargs=True)
        for name, block in gated_blocks(backbone.unet)
    ]
    try:
        _eps(backbone.unet, z, t, emb, gl)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_tiny_gligen_is_the_tiny_model_plus_gated_layers(gligen, tiny_backbone):
    folder = tiny_gligen_dir(0)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionGLIGENPipeline"
    assert gligen.unet.config.attention_type == "gated" and hasattr(gligen.unet, "position_net")
    transformer_blocks = [m for m in gligen.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(gated_blocks(gligen.unet)) == len(transformer_blocks) == 10  # 3 down, 1 mid, 2 in each of 3 up blocks
    plain, gated = tiny_backbone.unet.state_dict(), gligen.unet.state_dict()
    assert all(torch.equal(v, gated[k]) for k, v in plain.items())
    assert set(gated) - set(plain) and all(k.startswith("position_net.") or ".fuser." in k for k in set(gated) - set(plain))
    with pytest.raises(ModelLoadError, match="tiny-gligen:x"):
        resolve_model_source("tiny-gligen:x")


def test_parallel_block_equals_reground_formula(gligen):
    z, t, emb, gl = _unet_inputs(gligen)
    inputs = _block_inputs(gligen, z, t, emb, gl)
    blocks = dict(gated_blocks(gligen.unet))
    apply_wiring(gligen.unet, "parallel")
    assert current_wiring(gligen.unet) == "parallel"
    with torch.no_grad():
        for name, (hs, kw) in inputs.items():
            blk = blocks[name]
            objs, enc = kw["cross_attention_kwargs"]["gligen"]["objs"], kw["encoder_hidden_states"]
            h = hs + blk.attn1(blk.norm1(hs))
            gsa = blk.fuser(h, objs) - h  # diffusers' fuser returns h + gated terms
            ca = blk.attn2(blk.norm2(h), encoder_hidden_states=enc)
            h_par = h + gsa + ca
            expected = h_par + blk.ff(blk.norm3(h_par))
            got = blk(hs, **kw)
            assert gsa.abs().mean() > 1e-2, name  # the gates are on: the test can tell the wirings apart
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
            sequential = BasicTransformerBlock.forward(blk, hs, **kw)
            assert (got - sequential).abs().max() > 1e-3, name
            h_double = h + blk.fuser(h, objs) + ca  # the unofficial code's fuser(h) + attn2 + h
            double = h_double + blk.ff(blk.norm3(h_double))
            assert (got - double).abs().max() > 1e-1, name


def test_sequential_is_diffusers_block_and_remove_restores_bit_identical(gligen):
    z, t, emb, gl = _unet_inputs(gligen)
    before = _eps(gligen.unet, z, t, emb, gl)
    apply_wiring(gligen.unet, "parallel")
    rewired = _eps(gligen.unet, z, t, emb, gl)
    assert (rewired - before).abs().max() > 1e-3
    apply_wiring(gligen.unet, "sequential")
    assert all("forward" not in block.__dict__ for _, block in gated_blocks(gligen.unet))
    for name, (hs, kw) in _block_inputs(gligen, z, t, emb, gl).items():
        blk = dict(gated_blocks(gligen.unet))[name]
        with torch.no_grad():
            assert torch.equal(blk(hs, **kw), BasicTransformerBlock.forward(blk, hs, **kw)), name
    assert torch.equal(_eps(gligen.unet, z, t, emb, gl), before)
    with wired(gligen.unet, "parallel"):
        assert torch.equal(_eps(gligen.unet, z, t, emb, gl), rewired)
    assert current_wiring(gligen.unet) == "sequential"
    assert torch.equal(_eps(gligen.unet, z, t, emb, gl), before)


def test_fuser_off_or_zero_gates_both_wirings_are_the_plain_unet(gligen, tiny_backbone):
    # Fresh copies: safetensors' memory-mapped tensors can take other CPU kernel paths in the last bit.
    unet, plain_unet = copy.deepcopy(gligen.unet), copy.deepcopy(tiny_backbone.unet)
    z, t, emb, gl = _unet_inputs(gligen)
    plain = _eps(plain_unet, z, t, emb)
    grounded = _eps(unet, z, t, emb, gl)
    assert (grounded - plain).abs().max() > 1e-3
    set_fuser(unet, False)
    for wiring in ("sequential", "parallel"):
        with wired(unet, wiring):
            assert torch.equal(_eps(unet, z, t, emb, gl), plain), wiring
    # Fuser on with zero gates is the identity too: a double residual would add h a second time here.
    set_fuser(unet, True)
    with torch.no_grad():
        for _, block in gated_blocks(unet):
            block.fuser.alpha_attn.zero_()
            block.fuser.alpha_dense.zero_()
    with wired(unet, "parallel"):
        assert torch.equal(_eps(unet, z, t, emb, gl), plain)


def test_scheduled_sampling_switches_grounding_off_at_int_beta_steps(gligen):
    unet = gligen.unet
    first = gated_blocks(unet)[0][1]
    calls: list[tuple[bool, str]] = []
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append((first.fuser.enabled, current_wiring(unet))))
    results = {}
    try:
        for beta, wiring in ((0.5, "parallel"), (0.0, "parallel"), (0.0, "sequential"), (1.0, "parallel")):
            calls.clear()
            results[beta, wiring] = grounded_sample(
                gligen, PROMPT, PHRASES, BOXES, wiring, beta, steps=5, generator=torch.Generator().manual_seed(0), guidance_scale=1.0
            )
            n = int(beta * 5)
            assert calls == [(True, wiring)] * n + [(False, wiring)] * (5 - n), (beta, wiring)
            assert first.fuser.enabled and current_wiring(unet) == "sequential"  # restored on exit
    finally:
        handle.remove()
    # Grounding never on: both wirings are the plain model, bit for bit; grounding on: they differ.
    assert torch.equal(results[0.0, "parallel"], results[0.0, "sequential"])
    assert (results[0.5, "parallel"] - results[0.0, "parallel"]).abs().max() > 1e-3
    assert (results[1.0, "parallel"] - results[0.5, "parallel"]).abs().max() > 1e-3


def test_sequential_sampling_equals_diffusers_gligen_pipeline(gligen):
    from diffusers import StableDiffusionGLIGENPipeline

    pipe = StableDiffusionGLIGENPipeline(
        vae=gligen.vae, text_encoder=gligen.text_encoder, tokenizer=gligen.tokenizer, unet=gligen.unet,
        scheduler=make_scheduler("ddim", gligen.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT, gligen_phrases=PHRASES, gligen_boxes=BOXES, gligen_scheduled_sampling_beta=0.5, num_inference_steps=3,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(1), output_type="latent",
    ).images
    set_fuser(gligen.unet, True)  # the pipeline leaves the fusers off
    ours = grounded_sample(gligen, PROMPT, PHRASES, BOXES, "sequential", 0.5, 3, torch.Generator().manual_seed(1))
    assert torch.equal(ours, expected)
    parallel = grounded_sample(gligen, PROMPT, PHRASES, BOXES, "parallel", 0.5, 3, torch.Generator().manual_seed(1))
    assert (parallel - expected).abs().max() > 1e-3


def test_grounding_inputs_follow_gligen_layout(gligen):
    gl = grounding_inputs(gligen, PHRASES, BOXES, batch_size=2, classifier_free=True)
    assert gl["boxes"].shape == (4, MAX_OBJECTS, 4) and gl["positive_embeddings"].shape == (4, MAX_OBJECTS, 64)
    assert gl["masks"][:2].sum() == 0 and torch.equal(gl["masks"][2:, :2], torch.ones(2, 2)) and gl["masks"][:, 2:].sum() == 0
    assert torch.equal(gl["boxes"][3, :2], torch.tensor(BOXES))
    with torch.no_grad():
        pooled = gligen.text_encoder(**gligen.tokenizer(["a dog"], return_tensors="pt")).pooler_output[0]
    torch.testing.assert_close(gl["positive_embeddings"][3, 1], pooled)


@pytest.mark.parametrize(
    ("phrases", "boxes", "message"),
    [
        (["a cat"], [[0.1, 0.2, 1.2, 0.9]], r"boxes\[0\].*\[0, 1\]"),
        (["a cat"], [[-0.1, 0.2, 0.5, 0.9]], r"boxes\[0\].*\[0, 1\]"),
        (["a cat", "a dog"], [[0.1, 0.1, 0.5, 0.5], [0.6, 0.1, 0.6, 0.5]], r"boxes\[1\].*x1 \(0.6\) must be greater than x0 \(0.6\)"),
        (["a cat"], [[0.5, 0.1, 0.2, 0.5]], r"x1 \(0.2\) must be greater than x0 \(0.5\)"),
        (["a cat"], [[0.1, 0.5, 0.5, 0.4]], r"y1 \(0.4\) must be greater than y0 \(0.5\)"),
        (["a cat", "a dog"], [[0.1, 0.1, 0.5, 0.5]], r"2 phrase\(s\) but 1 box"),
        (["a cat"], [[0.1, 0.1, 0.5]], r"boxes\[0\].*4 numbers"),
        ([], [], "at least one phrase"),
        ([" "], [[0.1, 0.1, 0.5, 0.5]], r"phrases\[0\]: empty"),
        (["a cat"] * 31, [[0.1, 0.1, 0.5, 0.5]] * 31, "at most 30"),
    ],
)
def test_bad_layouts_are_clear_errors(phrases, boxes, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(phrases, boxes)


def test_non_gligen_model_and_bad_arguments_fail_before_compute(gligen, tiny_backbone):
    calls = []
    handle = tiny_backbone.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(NotGligenError, match="is not a GLIGEN model"):
            apply_wiring(tiny_backbone.unet, "parallel", "tiny")
        with pytest.raises(NotGligenError, match="not a GLIGEN model"):
            grounded_sample(tiny_backbone, PROMPT, PHRASES, BOXES, "parallel", steps=2)
    finally:
        handle.remove()
    assert not calls and all("forward" not in m.__dict__ for m in tiny_backbone.unet.modules())
    with pytest.raises(ValueError, match="wiring 'diagonal'"):
        apply_wiring(gligen.unet, "diagonal")
    with pytest.raises(ValueError, match="beta 1.5"):
        grounded_sample(gligen, PROMPT, PHRASES, BOXES, "parallel", beta=1.5, steps=2)
    with pytest.raises(LayoutError, match=r"boxes\[0\]"):
        grounded_sample(gligen, PROMPT, ["a cat"], [[0.5, 0.1, 0.4, 0.9]], "parallel", steps=2)
    assert current_wiring(gligen.unet) == "sequential"


def test_box_from_mask_is_the_tight_box():
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 4:10, 2:7] = 1  # rows 4..9, cols 2..6
    assert box_from_mask(mask) == [2 / 16, 4 / 16, 7 / 16, 10 / 16]
    assert box_from_mask(torch.ones(8, 8)) == [0.0, 0.0, 1.0, 1.0]
    validate_layout(["a cat"], [box_from_mask(mask)])
    with pytest.raises(LayoutError, match="empty"):
        box_from_mask(torch.zeros(8, 8))
    with pytest.raises(LayoutError, match="expected"):
        box_from_mask(torch.zeros(2, 1, 8, 8))
