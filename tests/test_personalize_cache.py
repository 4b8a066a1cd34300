"""Latent and text-embedding caching: the same losses as the uncached path, each view / prompt encoded once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dreamsteer.data.samples import write_subject_set
from dreamsteer.data.subject import Concept, SubjectDataset, read_instance_items
from dreamsteer.lit_modules.personalize import MODULES
from dreamsteer.train.config import compose
from dreamsteer.train.personalize import validate_config


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("subject")
    write_subject_set(directory, "cat", count=2)
    return directory


class CallCounter:
    """Wraps a module's method and counts the rows it is called on."""

    def __init__(self, monkeypatch, obj, name: str, rows):
        self.rows = 0
        original = getattr(obj, name)

        def counted(x, *args, **kwargs):
            self.rows += rows(x)
            return original(x, *args, **kwargs)

        monkeypatch.setattr(obj, name, counted)


def test_cached_latents_and_text_give_the_uncached_losses_with_one_encode_per_view_and_prompt(subject_dir, fresh_backbone, tmp_path, monkeypatch):
    cfg = validate_config(compose("personalize", [
        "method=lora", f"data.instance_dir={subject_dir}", "data.instance_prompt='a photo of sks cat'",
        f"output_dir={tmp_path}", "logger=none", "data.prompt_templates=object", "data.subject='sks cat'",
    ]))
    module = MODULES["lora"](OmegaConf.to_container(cfg), fresh_backbone)
    assert module.caches_latents and module.caches_text  # on by default (LoRA's text encoder is frozen)
    with torch.no_grad():  # a non-zero LoRA so the adapter takes part
        for p in fresh_backbone.adapter.trainable_parameters(fresh_backbone):
            p.add_(0.02)
    concept = Concept(read_instance_items(subject_dir), cfg.data.instance_prompt, subject="sks cat",
                      class_paths=[p.path for p in read_instance_items(subject_dir)], class_prompt="a photo of a cat")
    dataset = SubjectDataset([concept], 64, seed=0, flip_p=0.5, center_crop=False, templates=["a photo of a {}", "a rendering of a {}"])
    batches = [torch.utils.data.default_collate([dataset[i], dataset[i + 1]]) for i in range(0, 12, 2)]
    keys = [k for b in batches for k in [*b["latent_key"], *b["class_latent_key"]]]
    # the stream holds the same image both flipped and not: a key that ignored the flip would be caught
    assert any(k.endswith("|1") for k in keys) and any(k.endswith("|0") for k in keys)
    assert len(set(keys)) < len(keys)  # and repeated views, which the cache must serve
    prompts = [p for b in batches for p in [*b["prompt"], *b["class_prompt"]]]

    vae_rows = CallCounter(monkeypatch, fresh_backbone.vae, "encode", lambda x: x.shape[0])
    text_rows = CallCounter(monkeypatch, fresh_backbone.text_encoder, "forward", lambda ids: ids.shape[0])

    def losses(cached: bool) -> list[torch.Tensor]:
        module.caches_latents = module.caches_text = cached
        out = []
        for batch in batches:
            module.seed_micro_batch(batch)
            out.append(module.compute_loss(batch)[0].detach())
        return out

    uncached = losses(False)
    assert vae_rows.rows == len(keys) and text_rows.rows == len(prompts)
    vae_rows.rows = text_rows.rows = 0
    cached = losses(True)
    assert vae_rows.rows == len(set(keys)) and text_rows.rows == len(set(prompts))
    again = losses(True)
    assert vae_rows.rows == len(set(keys)) and text_rows.rows == len(set(prompts))  # the second pass encodes nothing
    for u, c, a in zip(uncached, cached, again):
        assert torch.allclose(u, c, rtol=1e-5, atol=1e-7), (u, c)  # each view encoded alone vs in a batch
        assert torch.equal(c, a)
    assert len({round(x.item(), 6) for x in uncached}) == len(uncached)  # different batches, different losses


def test_text_cache_is_off_when_the_text_encoder_trains(subject_dir, fresh_backbone, tmp_path):
    cfg = validate_config(compose("personalize", [
        "method=textual_inversion", f"data.instance_dir={subject_dir}", "data.instance_prompt='a photo of <sks> cat'",
        f"output_dir={tmp_path}", "logger=none",
    ]))
    module = MODULES["textual_inversion"](OmegaConf.to_container(cfg), fresh_backbone)
    assert module.caches_latents and not module.caches_text
