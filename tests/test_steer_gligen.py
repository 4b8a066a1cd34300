"""DreamSteerer's mode shifting grounded by the subject's GLIGEN box (`mode_shift.guidance=gligen_box`) on
the tiny GLIGEN model with a LoRA attached: it is ReGround's grounded sampling of the personalized model,
the box comes from the subject mask, and a non-GLIGEN base model fails before any compute."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamsteer.checkpoints import export_adapter, load_adapter
from dreamsteer.data.images import pil_to_tensor, resize_and_crop
from dreamsteer.data.samples import sample_photo, write_sample_images
from dreamsteer.diffusion.adapters import add_lora
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.diffusion.gligen import NotGligenError, box_from_mask, gated_blocks
from dreamsteer.diffusion.reground import current_wiring, grounded_sample
from dreamsteer.distill.subject_mask import subject_mask
from dreamsteer.lit_modules.dreamsteerer import DreamSteererModule, EDSDConfig, MaskConfig, ModeShiftConfig, OptimConfig, subject_phrase
from dreamsteer.train.config import compose
from dreamsteer.train.steer import run

SOURCE = "a photo of a cat next to a mirror"
REF = "a photo of a sks cat next to a mirror"
STEPS, N_MS, BETA, CFG = 4, 2, 0.5, 7.5
# threshold 0.8, no dilation: on the tiny model the cat's mask is a proper part of the frame, so its box is too
MASK = dict(timesteps=[300], divisors=[2, 4], threshold=0.8, dilation=0)


def _perturbed_lora(bb) -> None:
    """A LoRA moved off its zero init, as personalization would leave it."""
    add_lora(bb, rank=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.adapter.trainable_parameters(bb):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def gligen_lora():
    bb = load_backbone("tiny-gligen")
    _perturbed_lora(bb)
    with torch.no_grad():
        z_src = bb.encode_image(pil_to_tensor(resize_and_crop(sample_photo("cat"), bb.resolution))[None])
    return bb, z_src


@pytest.fixture(scope="module")
def mask_box(gligen_lora) -> list[float]:
    """The tight box of the source's subject mask with the MASK settings, computed directly."""
    bb, z_src = gligen_lora
    return box_from_mask(subject_mask(bb, z_src, SOURCE, "cat", (300,), (2, 4), 0.8, 0, seed=0, pretrained=True).mask)


def _module(bb, z_src, mask: dict = MASK, **mode_shift) -> DreamSteererModule:
    ms = ModeShiftConfig(guidance="gligen_box", n_ms=N_MS, sampling_steps=STEPS, guidance_scale=CFG, beta=BETA,
                         log_unguided=False, **mode_shift)
    return DreamSteererModule(bb, z_src, SOURCE, REF, "cat", EDSDConfig(), ms, MaskConfig(**mask), OptimConfig(), progress=False)


def _sample(bb, noise, box, wiring="parallel", beta=BETA) -> torch.Tensor:
    return grounded_sample(bb, REF, ["a sks cat"], [box], wiring, beta, STEPS, guidance_scale=CFG, num_images=N_MS, latents=noise)


def test_gligen_box_mode_shift_is_grounded_sampling_of_the_personalized_model(gligen_lora, mask_box):
    bb, z_src = gligen_lora
    module = _module(bb, z_src)
    module.subject = module.compute_mask()
    z = module.generate_mode_shift(0)
    noise = module._randn((N_MS, *z_src.shape[1:]), 7, 0)  # the module's draw for round 0

    # the box: the tight box of the source's subject mask (computed directly by the fixture)
    expected_box = mask_box
    assert module.ms_box == expected_box and expected_box != [0.0, 0.0, 1.0, 1.0]
    assert module.phrase == "a sks cat"

    # exactly ReGround's grounded sampling (parallel wiring) from the same noise, box and phrase
    assert torch.equal(z, _sample(bb, noise, expected_box))
    # beta = 0 (no grounding) is the module's unguided sample from that noise; the box changes the images
    unguided = module.generate_mode_shift(0, unguided=True)
    assert torch.equal(unguided, _sample(bb, noise, expected_box, beta=0.0))
    assert (z - unguided).abs().max() > 1e-3
    # the wiring key is used: sequential (GLIGEN) is another sample, and the module gives exactly it
    module.ms_cfg.wiring = "sequential"
    z_seq = module.generate_mode_shift(0)
    assert torch.equal(z_seq, _sample(bb, noise, expected_box, wiring="sequential"))
    assert (z - z_seq).abs().max() > 1e-4
    # it is the personalized model that samples: the base model (adapter off) gives another sample
    with bb.adapter_disabled():
        assert (z - _sample(bb, noise, expected_box)).abs().max() > 1e-4
    # the UNet is left as it was: diffusers' own block forward, every fuser on
    assert current_wiring(bb.unet) == "sequential"
    assert all(block.fuser.enabled for _, block in gated_blocks(bb.unet))


def test_box_from_mask_without_M_and_explicit_box_and_phrase(gligen_lora, mask_box, monkeypatch):
    bb, z_src = gligen_lora
    # mask.enabled=false: M = 1 in EDSD, but the box still comes from the subject mask of the mask.* settings
    module = _module(bb, z_src, mask={**MASK, "enabled": False})
    assert module.compute_mask() is None
    assert module.subject_box() == mask_box

    # an explicit box and phrase are used as given; no mask is computed for them
    def no_mask(*args, **kwargs):
        raise AssertionError("the subject mask must not be computed when mode_shift.box is set")

    monkeypatch.setattr("dreamsteer.lit_modules.dreamsteerer.subject_mask", no_mask)
    module = _module(bb, z_src, mask={**MASK, "enabled": False}, box=[0.1, 0.2, 0.6, 0.9], phrase="a sks cat")
    z = module.generate_mode_shift(0)
    assert module.ms_box == [0.1, 0.2, 0.6, 0.9]
    assert torch.equal(z, _sample(bb, module._randn((N_MS, *z_src.shape[1:]), 7, 0), [0.1, 0.2, 0.6, 0.9]))


def test_subject_phrase_from_the_prompts():
    assert subject_phrase(SOURCE, REF, "cat") == "a sks cat"  # LoRA / DreamBooth identifier
    assert subject_phrase(SOURCE, "a photo of a <sks> next to a mirror", "cat") == "a <sks>"  # TI replaces the word
    assert subject_phrase(SOURCE, "a photo of a <new1> cat next to a mirror", "cat") == "a <new1> cat"  # Custom Diffusion
    assert subject_phrase("the cat, by a mirror", "the sks cat, by a mirror", "cat") == "the sks cat"
    # a class token of several words (an inferred "yellow circle") is anchored at its noun
    assert subject_phrase("a yellow circle on a white background", "a sks circle on a white background", "yellow circle") == "a sks circle"
    with pytest.raises(ValueError, match="mode_shift.phrase"):
        subject_phrase("a photo of a dog", "a photo of a sks dog", "cat")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("steer_gligen")
    write_sample_images(root, ["cat"])
    return root / "cat.png"


def _overrides(adapter: Path, photo: Path, out: Path, *extra: str) -> list[str]:
    return [f"adapter={adapter}", f"image={photo}", f"source_prompt='{SOURCE}'", f"ref_prompt='{REF}'", f"output_dir={out}",
            "mode_shift.guidance=gligen_box", "logger=none", "progress=false", *extra]


def test_gligen_box_on_a_plain_model_fails_before_any_compute(fresh_backbone, tiny_dir, photo, tmp_path, monkeypatch):
    bb = fresh_backbone  # the plain tiny SD model: no gated layers
    _perturbed_lora(bb)
    with pytest.raises(NotGligenError, match=r"config key 'mode_shift.guidance'.*not a GLIGEN model"):
        _module(bb, torch.zeros(1, 4, 16, 16))
    adapter = export_adapter(bb, tmp_path / "lora", {"instance_prompt": "a photo of sks cat"})

    def not_reached(*args, **kwargs):
        raise AssertionError("the adapter was loaded before the base model was checked")

    monkeypatch.setattr("dreamsteer.train.steer.load_adapter", not_reached)
    with pytest.raises(NotGligenError, match="config key 'mode_shift.guidance'"):
        run(compose("steer", _overrides(adapter, photo, tmp_path / "run", f"model.pretrained={tiny_dir}")))


@pytest.mark.parametrize("override, key", [
    ("mode_shift.wiring=diagonal", "mode_shift.wiring"),
    ("mode_shift.beta=1.5", "mode_shift.beta"),
    ("mode_shift.beta=0.1", "mode_shift.beta"),  # int(0.1 * 4) = 0 grounded steps
    ("mode_shift.box=[0.6,0.1,0.4,0.9]", "mode_shift.box"),
    ("mode_shift.guidance=boxes", "mode_shift.guidance"),
])
def test_bad_grounding_keys_are_named(override, key, photo, tmp_path):
    overrides = _overrides(tmp_path / "missing_adapter", photo, tmp_path / "run", "mode_shift.sampling_steps=4", override)
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        run(compose("steer", overrides))


def test_steer_task_with_gligen_box_exports_a_steered_adapter(gligen_lora, mask_box, photo, tmp_path):
    bb, _ = gligen_lora
    parent = export_adapter(bb, tmp_path / "parent", {"instance_prompt": "a photo of sks cat", "training_steps": 5})
    out = tmp_path / "run"
    steered = run(compose("steer", _overrides(
        parent, photo, out, "model=tiny_gligen", "steps=2", "mode_shift.n_ms=1", "mode_shift.sampling_steps=2",
        "mode_shift.beta=1.0", "mode_shift.wiring=sequential", "mask.timesteps=[300]", "mask.threshold=0.8", "mask.dilation=0",
        "mode_shift.log_unguided=true",
    )))
    info = json.loads((steered / "adapter.json").read_text())["steering"]
    assert info["config"]["mode_shift"]["guidance"] == "gligen_box" and info["config"]["mode_shift"]["wiring"] == "sequential"
    assert info["mode_shift_grounding"] == {"phrase": "a sks cat", "box": mask_box}  # the same photo and mask settings
    assert (out / "mode_shift_guided.png").is_file() and (out / "mode_shift_unguided.png").is_file()
    # the steered LoRA reloads on the GLIGEN base model and has moved (not the fusers' LoRA layers: no
    # grounding in the EDSD and L_ms calls, so they get no gradient)
    before, after = load_backbone("tiny-gligen"), load_backbone("tiny-gligen")
    load_adapter(before, parent)
    load_adapter(after, steered)
    params = list(zip(before.adapter.named_trainable(before), after.adapter.named_trainable(after)))
    moved = {name for (name, p), (_, q) in params if not torch.equal(p, q)}
    assert moved == {name for (name, _), _ in params if ".fuser." not in name}
