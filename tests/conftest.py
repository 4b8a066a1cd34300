"""Shared fixtures: one tiny-model cache per test session, and backbones loaded from it."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Idle OpenMP threads spin by default; with several processes on 2 cores that stalls everyone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Build the tiny model once per session in a private cache (subprocesses inherit the variable), removed at exit.
if "DREAMSTEER_CACHE" not in os.environ:
    os.environ["DREAMSTEER_CACHE"] = tempfile.mkdtemp(prefix="dreamsteer-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DREAMSTEER_CACHE"], ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from dreamsteer.diffusion.tiny import tiny_model_dir

    return tiny_model_dir(0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir):
    """A shared, read-only tiny backbone. Tests that modify a model use `fresh_backbone`."""
    from dreamsteer.diffusion.backbone import load_backbone

    return load_backbone(str(tiny_dir))


@pytest.fixture
def fresh_backbone(tiny_dir):
    """A tiny backbone of the test's own, free to be modified."""
    from dreamsteer.diffusion.backbone import load_backbone

    return load_backbone(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_sdxl_dir() -> Path:
    from dreamsteer.diffusion.tiny import tiny_sdxl_model_dir

    return tiny_sdxl_model_dir(0)


@pytest.fixture(scope="session")
def tiny_sdxl_backbone(tiny_sdxl_dir):
    """A shared, read-only tiny SDXL backbone. Tests that modify a model use `fresh_sdxl_backbone`."""
    from dreamsteer.diffusion.backbone import load_backbone

    return load_backbone(str(tiny_sdxl_dir))


@pytest.fixture
def fresh_sdxl_backbone(tiny_sdxl_dir):
    """A tiny SDXL backbone of the test's own, free to be modified."""
    from dreamsteer.diffusion.backbone import load_backbone

    return load_backbone(str(tiny_sdxl_dir))


def direct_conditioning(bb, prompts, latents):
    """``(encoder_hidden_states, UNet keyword arguments)`` for `prompts` computed without `diffusion.family`, the
    reference of the gradient tests. SD 1.x/2.x: ``bb.encode_prompt`` (the text encoder's last hidden state), no
    added conditions. SDXL: diffusers' own ``StableDiffusionXLPipeline.encode_prompt`` (zeros for "", as its
    classifier-free guidance uses) and ``_get_add_time_ids`` for an uncropped image of the latents' pixel size."""
    from diffusers import StableDiffusionXLPipeline

    if bb.text_encoder_2 is None:
        return bb.encode_prompt(prompts), {}
    pipe = StableDiffusionXLPipeline(vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2, tokenizer=bb.tokenizer,
                                     tokenizer_2=bb.tokenizer_2, unet=bb.unet, scheduler=bb.sampling_scheduler, add_watermarker=False)
    with torch.no_grad():
        hidden, pooled = pipe.encode_prompt([p or "x" for p in prompts], device=bb.device, do_classifier_free_guidance=False)[::2]
    empty = torch.tensor([p == "" for p in prompts]).reshape(-1, 1)
    hidden, pooled = hidden.masked_fill(empty[..., None], 0.0), pooled.masked_fill(empty, 0.0)
    size = (latents.shape[-2] * 8, latents.shape[-1] * 8)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, hidden.dtype, bb.text_encoder_2.config.projection_dim)
    return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}}


@pytest.fixture
def transformers_refusing_peft(monkeypatch):
    """Simulate transformers 5.24.0 (which requires peft >= 0.22.0) beside peft 0.21.2: the installed versions and
    transformers' minimum, as the text-encoder LoRA guard reads them."""
    import importlib.metadata

    import transformers.integrations.peft

    real_version = importlib.metadata.version
    fake = {"transformers": "5.24.0", "peft": "0.21.2"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real_version(name))
    monkeypatch.setattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0.22.0")
