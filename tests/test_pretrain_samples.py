"""`train pretrain samples.every_n_steps=N`: sample images and their numbers as a run trains (train/pretrain_samples.py)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamsteer.train.config import ConfigError, compose
from tests.test_pretrain import TINY


def _run(stage: str, out, *extra: str):
    from dreamsteer.train.pretrain import run

    return run(compose("pretrain", [f"stage={stage}", f"output_dir={out}", *TINY, *extra]))


def _numbers(out) -> dict[int, dict]:
    """Each step's samples/step<N>.json."""
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted((out / "samples").glob("step*.json"))}


def test_vae_samples_are_the_held_out_scenes_reconstructed_and_their_error(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from dreamsteer.data.images import pil_to_tensor
    from dreamsteer.data.scenes import random_scene
    from dreamsteer.train.pretrain_samples import SAMPLE_SCENES_SEED

    model = _run("vae", tmp_path / "vae", "trainer.max_steps=3", "samples.every_n_steps=2", "samples.count=5")
    assert sorted(p.name for p in (tmp_path / "vae" / "samples").glob("*.png")) == ["step000002.png", "step000003.png"]
    logged = _numbers(tmp_path / "vae")
    assert sorted(logged) == [2, 3] and all(set(v) == {"step", "recon_error", "captions"} for v in logged.values())
    # the last one, computed here from the exported VAE and the scenes drawn here
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    x = torch.stack([pil_to_tensor(random_scene((SAMPLE_SCENES_SEED, 0, i + 1), resolution=16).image) for i in range(5)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert logged[3]["recon_error"] == pytest.approx(float((recon - x).abs().mean()) * 127.5, rel=1e-4)
    assert "step 3 samples (5): recon_error" in "".join(capsys.readouterr())


def test_unet_samples_are_read_by_the_detector_and_leave_the_training_as_it_was(tmp_path):
    """On the toy model (one training step at a learning rate too small to change what it draws), so the rates
    are those of a model that draws the scenes: they must equal the floors' rule applied here to its export."""
    from dreamsteer.benchmarks.toy_floors import sample_images
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.metrics.detector import caption_agreement, detect
    from dreamsteer.train.pretrain_samples import held_out_scenes

    toy_sized = ["arch.resolution=32", "init=toy", "trainer.max_steps=1", "optim.lr=1e-9", "data.batch_size=1"]
    plain = _run("unet", tmp_path / "plain", *toy_sized)
    sampled = _run("unet", tmp_path / "sampled", *toy_sized, "samples.every_n_steps=1", "samples.count=12", "samples.seed=7")
    for part in ("unet", "text_encoder"):
        a, b = load_file(next((plain / part).glob("*.safetensors"))), load_file(next((sampled / part).glob("*.safetensors")))
        assert all(torch.equal(a[k], b[k]) for k in a), part  # the same weights with and without the samples
    assert sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir()) == ["step000001.json", "step000001.png"]
    logged = _numbers(tmp_path / "sampled")[1]
    _, captions = held_out_scenes(12, 32)
    assert logged["captions"] == captions
    images = sample_images(load_backbone(str(sampled)), captions, [7 + i for i in range(12)], steps=25, guidance=7.5)
    agree = [caption_agreement(detect(image), caption) for image, caption in zip(images, captions)]
    objects = [(c, s) for a in agree for c, s in zip(a["colors"], a["shapes"])]
    two = [a["count"] for a in agree if len(a["colors"]) == 2]
    assert logged["background"] == pytest.approx(np.mean([a["background"] for a in agree]))
    assert logged["color"] == pytest.approx(np.mean([c for c, _ in objects]))
    assert logged["shape"] == pytest.approx(np.mean([s for _, s in objects]))
    assert logged["count"] == pytest.approx(np.mean(two))
    assert logged["background"] >= 0.9 and logged["color"] >= 0.8  # a model that draws its captions


def test_folder_samples_are_its_first_images_with_no_detector_numbers(tmp_path, capsys):
    """data.source=folder: the truth row is the folder's first images in its order, the captions theirs; the VAE's
    error is still measured, the UNet's samples get no detector rates (the detector reads only the toy world)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    colors = {"c.png": (0, 0, 255), "a.png": (255, 0, 0), "b.png": (0, 255, 0)}  # listed a, b, c
    for name, color in colors.items():
        Image.new("RGB", (32, 32), color).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"photo {name[0]}")
    data = ["data.source=folder", f"data.folder={folder}", "samples.every_n_steps=1", "samples.count=2", "trainer.max_steps=1"]
    vae = _run("vae", tmp_path / "vae", *data)
    logged = _numbers(tmp_path / "vae")[1]
    assert logged["captions"] == ["photo a", "photo b"] and set(logged) == {"step", "recon_error", "captions"}
    grid = np.asarray(Image.open(tmp_path / "vae" / "samples" / "step000001.png"))
    cell = 96 + 2  # image_grid enlarges 16 px to 96, with 2-pixel gaps; the truths are the first row
    assert tuple(grid[48, 48]) == (255, 0, 0) and tuple(grid[48, cell + 48]) == (0, 255, 0)

    _run("unet", tmp_path / "unet", f"vae={vae / 'vae'}", *data)
    logged = _numbers(tmp_path / "unet")[1]
    assert set(logged) == {"step", "captions"} and logged["captions"] == ["photo a", "photo b"]
    assert "step 1 samples (2): written" in "".join(capsys.readouterr())


def test_held_out_scenes_are_none_a_training_run_draws():
    """Their keys (SAMPLE_SCENES_SEED, 0, i + 1) are not the (seed, i) of a run's training scenes, even a run seeded alike
    (numpy's seeding drops trailing zeros: (s, 0, 0) is (s, 0))."""
    from dreamsteer.data.images import pil_to_tensor
    from dreamsteer.data.scenes import SceneDataset
    from dreamsteer.train.pretrain_samples import SAMPLE_SCENES_SEED, held_out_scenes

    images, captions = held_out_scenes(8, 32)
    trained = SceneDataset(8, seed=SAMPLE_SCENES_SEED)
    assert len(set(captions)) > 1
    assert not any(torch.equal(pil_to_tensor(image), trained[i]["pixel_values"]) for i, image in enumerate(images))
    assert captions != [trained[i]["caption"] for i in range(8)]


def test_bad_sample_settings_are_refused_before_training(tmp_path):
    from dreamsteer.train.pretrain import validate_config

    with pytest.raises(ConfigError, match=r"'samples\.\*': every_n_steps -1"):
        validate_config(compose("pretrain", ["stage=vae", "samples.every_n_steps=-1", f"output_dir={tmp_path}"]), check_folders=False)
    with pytest.raises(ConfigError, match=r"count 0 in \[1, 64\]"):
        validate_config(compose("pretrain", ["stage=vae", "samples.count=0", f"output_dir={tmp_path}"]), check_folders=False)
    with pytest.raises(ConfigError, match=r"'samples\.every_n_steps': stage=gligen draws no samples"):
        validate_config(compose("pretrain", ["stage=gligen", "init=toy", "samples.every_n_steps=100", f"output_dir={tmp_path}"]),
                        check_folders=False)
