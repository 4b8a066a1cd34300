"""Aspect-ratio buckets, and exact resume with caching + EMA + buckets (+ masks, caption shuffle) on together."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamsteer.data.subject import Concept, SubjectDataset, aspect_buckets, read_instance_items
from dreamsteer.train.config import compose
from dreamsteer.train.personalize import run

SIZES = [(96, 64), (96, 64), (64, 96), (64, 96), (64, 64)]  # landscape, portrait, square


def write_mixed(directory: Path, masks: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(directory / f"img_{i}.png")
        if masks:
            mask = np.full((h, w), 255, dtype=np.uint8)
            mask[:, : w // 4] = 0
            Image.fromarray(mask).save(directory / f"img_{i}.mask.png")


def test_buckets_are_the_sizes_under_the_area_and_batches_share_one(tmp_path):
    assert aspect_buckets(512, 64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert aspect_buckets(64, 16) == [(48, 80), (64, 64), (80, 48)]
    write_mixed(tmp_path / "subject")
    items = read_instance_items(tmp_path / "subject")
    dataset = SubjectDataset([Concept(items, "a photo of sks cat")], 64, center_crop=False, bucket_step=16, batch_size=2)
    expected = {f"img_{i}.png": {(96, 64): (80, 48), (64, 96): (48, 80), (64, 64): (64, 64)}[s] for i, s in enumerate(SIZES)}
    seen = set()
    # 3 batches per epoch: 2 landscape, 2 portrait, the square one padded with itself
    for g in range(9):
        pair = [dataset[2 * g], dataset[2 * g + 1]]
        shapes = {tuple(e["pixel_values"].shape) for e in pair}
        assert len(shapes) == 1  # one bucket per micro-batch
        for e in pair:
            name = Path(e["latent_key"].split("|")[0]).name
            w, h = expected[name]
            assert e["pixel_values"].shape == (3, h, w) and f"|{w}x{h}|" in e["latent_key"]
            seen.add(name)
        if g % 3 == 2:  # every epoch shows every image
            assert seen == set(expected)
            seen = set()
    again = SubjectDataset([Concept(items, "a photo of sks cat")], 64, center_crop=False, bucket_step=16, batch_size=2)
    assert all(torch.equal(again[i]["pixel_values"], dataset[i]["pixel_values"]) for i in (0, 7, 13))


class Crash:
    """A Lightning callback that stops the run at `step` (after that step's checkpoint)."""

    def __init__(self, step: int):
        from lightning.pytorch.callbacks import Callback

        outer = self

        class _Crash(Callback):
            def on_train_batch_start(self, trainer, *args) -> None:
                if trainer.global_step == outer.step:
                    raise RuntimeError("simulated crash")

        self.step = step
        self.callback = _Crash()


def test_resume_is_exact_with_caching_ema_buckets_masks_and_caption_shuffle(tmp_path):
    from safetensors.torch import load_file

    write_mixed(tmp_path / "subject", masks=True)
    extra = [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='sks cat, a photo, grass, sunny'",
        "logger=none", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "data.batch_size=2",
        "data.resolution=64", "data.buckets=true", "data.bucket_step=16", "data.center_crop=false", "data.masks=files",
        "data.shuffle_captions=true", "data.keep_tokens=1", "data.caption_dropout=0.2", "ema.enabled=true", "ema.decay=0.9",
        "method.lr=1e-3", "method.dropout=0.1",
    ]
    assert compose("personalize", extra).cache.latents  # caching is on by default
    straight = run(compose("personalize", [*extra, f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose("personalize", [*extra, f"output_dir={tmp_path / 'b'}"]), callbacks=[Crash(2).callback])
    resumed = run(compose("personalize", [*extra, f"output_dir={tmp_path / 'b'}", "ckpt_path=last"]))

    a, b = load_file(str(straight / "pytorch_lora_weights.safetensors")), load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert ca["ema"]["updates"] == cb["ema"]["updates"] == 4
    assert all(torch.equal(ca["ema"]["shadow"][k], cb["ema"]["shadow"][k]) for k in ca["ema"]["shadow"])
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
