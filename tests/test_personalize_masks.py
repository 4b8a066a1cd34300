"""Masked training: mask files follow each view's crop and flip; masked pixels get no gradient."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dreamsteer.data.subject import Concept, SubjectDataError, SubjectDataset, read_instance_items
from dreamsteer.lit_modules.personalize import MODULES
from dreamsteer.train.config import compose
from dreamsteer.train.personalize import validate_config


def write_half_images(directory: Path, count: int = 2) -> None:
    """96x64 images whose left/right parts differ, each with a mask equal to its own grey level."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        grey = np.zeros((64, 96), dtype=np.uint8)
        grey[:, : 40 + 8 * i] = 255
        grey[:, 70:] = rng.integers(0, 256, (64, 26))
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(directory / f"img_{i}.png")
        Image.fromarray(grey).save(directory / f"img_{i}.mask.png")


def test_masks_follow_crop_and_flip_and_are_not_instance_images(tmp_path):
    write_half_images(tmp_path / "subject")
    items = read_instance_items(tmp_path / "subject", masks=True)
    assert [item.path.name for item in items] == ["img_0.png", "img_1.png"]  # mask files are no instances
    assert [item.mask.name for item in items] == ["img_0.mask.png", "img_1.mask.png"]
    dataset = SubjectDataset([Concept(items, "a photo of sks cat")], 64, center_crop=False, flip_p=0.5)
    flips = set()
    for i in range(12):
        example = dataset[i]
        # the mask is the image's own grey level, so the same crop and flip give mask == (pixels + 1) / 2
        assert torch.allclose(example["loss_mask"][0], (example["pixel_values"][0] + 1) / 2, atol=1e-5)
        flips.add(example["latent_key"][-1])
    assert flips == {"0", "1"}
    assert "loss_mask" not in SubjectDataset([Concept(read_instance_items(tmp_path / "subject"), "x")], 64)[0]

    (tmp_path / "subject" / "img_1.mask.png").unlink()
    with pytest.raises(SubjectDataError, match=r"img_1.png has no mask file img_1.mask.png"):
        read_instance_items(tmp_path / "subject", masks=True)
    Image.new("L", (96, 64)).save(tmp_path / "subject" / "img_1.mask.png")
    with pytest.raises(SubjectDataError, match=r"img_1.mask.png: is all black"):
        read_instance_items(tmp_path / "subject", masks=True)
    Image.new("L", (64, 64), 255).save(tmp_path / "subject" / "img_1.mask.png")
    with pytest.raises(SubjectDataError, match=r"img_1.mask.png: 64x64 but its image is 96x64"):
        read_instance_items(tmp_path / "subject", masks=True)


def test_masked_pixels_get_no_gradient_and_the_loss_is_the_masked_mean(tmp_path, fresh_backbone):
    directory = tmp_path / "subject"
    directory.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(directory / "img.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 24:] = 255  # latent columns 3..7 of 8 learned, 0..2 ignored
    Image.fromarray(mask).save(directory / "img.mask.png")
    cfg = validate_config(compose("personalize", [
        "method=lora", f"data.instance_dir={directory}", "data.instance_prompt='a photo of sks cat'", "data.masks=files",
        f"output_dir={tmp_path}", "logger=none",
    ]))
    module = MODULES["lora"](OmegaConf.to_container(cfg), fresh_backbone)
    dataset = SubjectDataset([Concept(read_instance_items(directory, masks=True), cfg.data.instance_prompt)], 64, flip_p=0.0)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])

    outputs = []

    def keep_output(module_, args, output):
        output.sample.retain_grad()
        outputs.append(output.sample)

    handle = fresh_backbone.unet.register_forward_hook(keep_output)
    grads = {}
    for masked in (True, False):
        b = batch if masked else {k: v for k, v in batch.items() if k != "loss_mask"}
        module.seed_micro_batch(b)
        loss, _ = module.compute_loss(b)
        loss.backward()
        grads[masked] = (loss.detach(), outputs[-1].grad.clone(), outputs[-1].detach())
    handle.remove()

    loss, grad, pred = grads[True]
    assert torch.all(grad[..., :3] == 0) and torch.all(grad[..., 3:] != 0)
    assert torch.all(grads[False][1][..., :3] != 0)  # without the mask those pixels do get gradient
    unmasked_loss, unmasked_grad, unmasked_pred = grads[False]
    assert torch.equal(pred, unmasked_pred)  # same draws: only the weighting differs
    # d mean(e^2) / d pred = 2 (pred - target) / numel: recover the per-pixel error, then the masked mean by hand
    diff = unmasked_grad * unmasked_grad.numel() / 2
    expected = diff[..., 3:].square().mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(loss, expected, rtol=1e-4), (loss, expected)
    assert torch.allclose(grad[..., 3:], unmasked_grad[..., 3:] * 8 / 5, rtol=1e-4, atol=1e-12)


def test_attention_masks_come_from_the_base_models_cross_attention_and_feed_training(tmp_path, tiny_dir):
    from lightning.pytorch.callbacks import Callback

    from dreamsteer.data.images import load_image, pil_to_tensor
    from dreamsteer.data.samples import write_subject_set
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.distill.subject_mask import subject_mask
    from dreamsteer.train.personalize import run

    paths = write_subject_set(tmp_path / "subject", "cat", count=2)
    base = [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        f"output_dir={tmp_path / 'run'}", "logger=none", "export.enabled=false", "data.masks=attention",
    ]
    with pytest.raises(SubjectDataError, match="data.mask_token' must be set"):
        run(compose("personalize", base))
    with pytest.raises(SubjectDataError, match="does not contain data.mask_token 'dog'"):
        run(compose("personalize", [*base, "data.mask_token=dog"]))

    batches = []

    class Keep(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            batches.append(batch)

    run(compose("personalize", [*base, "data.mask_token=cat", "trainer.max_steps=1", "data.mask_dilation=0"]), callbacks=[Keep()])
    assert "loss_mask" in batches[0]
    backbone = load_backbone(str(tiny_dir))
    for path in paths:
        written = np.asarray(Image.open(tmp_path / "run" / "masks" / f"{path.name}.mask.png"))
        image = load_image(path)
        assert written.shape == (image.size[1], image.size[0]) and set(np.unique(written)) <= {0, 255}
        z = backbone.encode_image(pil_to_tensor(image.resize((128, 128), Image.Resampling.BICUBIC))[None])
        expected = subject_mask(backbone, z, "a photo of sks cat", "cat", threshold=0.3, dilation=0).mask[0, 0]
        small = np.asarray(Image.fromarray(written).resize(tuple(expected.shape[::-1]), Image.Resampling.NEAREST)) > 0
        assert np.array_equal(small, expected.numpy() > 0.5)
        assert 0 < small.mean() < 1  # a real subject mask: some pixels kept, some ignored
