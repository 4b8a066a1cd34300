"""Multi-concept personalization (``data.concepts``) and Custom Diffusion's resize augmentation."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from dreamsteer.data.subject import (
    ZOOM_IN_PREFIXES, ZOOM_OUT_PREFIXES, Concept, SubjectDataError, SubjectDataModule, SubjectDataset, read_instance_items,
    validate_subject_data,
)
from dreamsteer.lit_modules.personalize import MODULES
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run, validate_config

RED, BLUE, GREEN, YELLOW = (220, 30, 30), (30, 30, 220), (30, 200, 30), (220, 220, 30)


def write_solid(directory: Path, rgb: tuple[int, int, int], count: int, size: tuple[int, int] = (64, 64)) -> Path:
    """`count` images of one colour (image k a little brighter in red, so each can be told apart)."""
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", size, (rgb[0] - 10 * k, rgb[1], rgb[2])).save(directory / f"img_{k}.png")
    return directory


def colour(pixels: torch.Tensor) -> tuple[int, ...]:
    """The mean colour of a [3, H, W] tensor in [-1, 1], as 8-bit RGB."""
    return tuple(round(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def concepts_override(*entries: dict[str, str]) -> str:
    return "data.concepts=[" + ",".join("{" + ",".join(f"{k}:'{v}'" for k, v in e.items()) + "}" for e in entries) + "]"


def test_concepts_are_balanced_and_keep_their_own_prompts_and_class_images(tmp_path):
    dog, cat = write_solid(tmp_path / "dog", RED, 4), write_solid(tmp_path / "cat", BLUE, 1)
    dogs, cats = write_solid(tmp_path / "dogs", GREEN, 2), write_solid(tmp_path / "cats", YELLOW, 3)
    cfg = compose("personalize", [concepts_override(
        {"instance_dir": dog, "instance_prompt": "a photo of sks dog", "class_dir": dogs, "class_prompt": "a photo of a dog", "token": "sks"},
        {"instance_dir": cat, "instance_prompt": "a photo of zwx cat", "class_dir": cats, "class_prompt": "a photo of a cat", "token": "zwx"},
    )]).data
    concepts = validate_subject_data(cfg, prior_preservation=True)
    assert [c.key for c in concepts] == ["data.concepts[0]", "data.concepts[1]"] and [len(c.items) for c in concepts] == [4, 1]
    concepts = [replace(c, class_paths=sorted(Path(c.class_dir).iterdir())) for c in concepts]
    expected = {RED: ("a photo of sks dog", "a photo of a dog", GREEN), BLUE: ("a photo of zwx cat", "a photo of a cat", YELLOW)}

    def check(example) -> tuple[int, ...]:
        # which concept: told by the colour of the pixels, not by anything the dataset says
        seen = colour(example["pixel_values"])
        prompt, class_prompt, class_colour = expected[RED if seen[0] > seen[2] else BLUE]
        assert example["prompt"] == prompt and example["class_prompt"] == class_prompt
        class_seen = colour(example["class_pixel_values"])
        assert class_seen[1:] == class_colour[1:] and class_colour[0] - 20 <= class_seen[0] <= class_colour[0]
        return seen

    plain = SubjectDataset(concepts, 64, center_crop=False)
    seen = [check(plain[i]) for i in range(16)]
    assert [s[2] > 100 for s in seen] == [i % 2 == 1 for i in range(16)]  # concept i mod 2: one dog, one cat, ...
    assert {s[0] for s in seen[0:8:2]} == {220, 210, 200, 190}  # each dog photo once per dog epoch
    # with buckets: batches of one size, each epoch holding the single cat photo 4 times against 4 dog photos
    bucketed = SubjectDataset(concepts, 64, center_crop=False, bucket_step=16, batch_size=2)
    seen = [check(bucketed[i]) for i in range(32)]
    assert sum(s[2] > 100 for s in seen) == 16


def test_textual_inversion_concepts_fill_the_templates_with_their_own_subject(tmp_path):
    write_solid(tmp_path / "a", RED, 2), write_solid(tmp_path / "b", BLUE, 2)
    cfg = compose("personalize", [
        "method=textual_inversion", "method.tokens=['<a>','<b>']", "data.prompt_templates=object",
        concepts_override({"instance_dir": tmp_path / "a", "instance_prompt": "a photo of <a> dog", "token": "<a>", "subject": "<a> dog"},
                          {"instance_dir": tmp_path / "b", "instance_prompt": "a photo of <b> pot", "token": "<b>", "subject": "<b> pot"}),
    ]).data
    dataset = SubjectDataset(validate_subject_data(cfg, ["<a>", "<b>"]), 64, templates=["a photo of a {}", "a rendering of the {}"])
    for i in range(8):
        example = dataset[i]
        own, other = ("<a> dog", "<b>") if colour(example["pixel_values"])[0] > 100 else ("<b> pot", "<a>")
        assert own in example["prompt"] and other not in example["prompt"]


def test_lora_run_with_two_concepts_draws_from_both_with_prior_preservation_per_concept(tmp_path):
    from lightning.pytorch.callbacks import Callback

    write_solid(tmp_path / "dog", RED, 2), write_solid(tmp_path / "cat", BLUE, 2), write_solid(tmp_path / "dogs", GREEN, 2)
    batches = []

    class Keep(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            batches.append(batch)

    out = run(compose("personalize", [
        "method=lora", "logger=none", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2", "data.batch_size=2", "data.resolution=64",
        "loss.prior_preservation=true", "data.num_class_images=2", "data.class_steps=2", "data.class_batch_size=2",
        "validation.every_n_steps=2", "validation.steps=2", "validation.num_images=1",
        concepts_override(  # the dog's class images are given, the cat's are generated into the run folder
            {"instance_dir": tmp_path / "dog", "instance_prompt": "a photo of sks dog", "token": "sks", "class_dir": tmp_path / "dogs", "class_prompt": "a photo of a dog"},
            {"instance_dir": tmp_path / "cat", "instance_prompt": "a photo of zwx cat", "token": "zwx", "class_prompt": "a photo of a cat"},
        ),
    ]), callbacks=[Keep()])
    assert len(list((tmp_path / "run" / "class_images" / "concept1").glob("*.png"))) == 2
    assert not (tmp_path / "dogs" / "class_00002.png").exists()  # a full class_dir is not added to
    pairs = [(colour(b["pixel_values"][j]), b["prompt"][j], b["class_prompt"][j], colour(b["class_pixel_values"][j])) for b in batches for j in range(2)]
    assert len(pairs) == 4
    for pixels, prompt, class_prompt, class_pixels in pairs:
        dog = pixels[0] > pixels[2]
        assert prompt == ("a photo of sks dog" if dog else "a photo of zwx cat")
        assert class_prompt == ("a photo of a dog" if dog else "a photo of a cat")
        assert (class_pixels[1] == GREEN[1]) == dog  # the dog's class images are the green ones, the cat's are generated
    assert sum(p[0][0] > p[0][2] for p in pairs) == 2  # two examples of each concept

    samples = json.loads((tmp_path / "run" / "samples" / "step000002" / "prompts.json").read_text())
    assert samples["prompts"] == ["a photo of sks dog", "a photo of zwx cat"]  # validation samples every concept

    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["concepts"] == [
        {"token": "sks", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"},
        {"token": "zwx", "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of a cat"},
    ]
    assert manifest["instance_prompt"] == "a photo of sks dog"
    card = (out / "README.md").read_text()
    assert "`sks`: `a photo of sks dog` (class prompt `a photo of a dog`)" in card and "`zwx`: `a photo of zwx cat`" in card


def test_custom_diffusion_learns_each_modifier_token_from_its_concept_and_loads_back(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from dreamsteer.checkpoints import load_adapter
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.train.sample import run as sample_run

    write_solid(tmp_path / "cat", RED, 2), write_solid(tmp_path / "pot", BLUE, 2)
    out = run(compose("personalize", [
        "method=custom_diffusion", "method.modifier_tokens=['<new1>','<new2>']", "method.initializer_token=['*',dog]", "method.lr=1e-3", "optim.weight_decay=0",
        "logger=none", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2", "data.resolution=64",
        "trainer.checkpoint_every_n_steps=1", "trainer.keep_all_checkpoints=true",
        concepts_override({"instance_dir": tmp_path / "cat", "instance_prompt": "a photo of <new1> cat", "token": "<new1>"},
                          {"instance_dir": tmp_path / "pot", "instance_prompt": "a <new2> pot", "token": "<new2>"}),
    ]))
    base = load_backbone(str(tiny_dir))
    star, dog = (base.text_encoder.get_input_embeddings().weight[base.tokenizer.encode(w, add_special_tokens=False)[0]].detach() for w in ("*", "dog"))

    def rows(step: int) -> torch.Tensor:
        state = torch.load(tmp_path / "run" / "checkpoints" / f"step{step:06d}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        return next(v for k, v in state.items() if k.endswith("token_embedding.new"))

    # step 1 saw only concept 0 (<new1>), step 2 concept 1 (<new2>): without weight decay a row moves only when its prompts train it
    # (each row starts from its own initializer token)
    assert not torch.equal(rows(1)[0], star) and torch.equal(rows(1)[1], dog)
    assert not torch.equal(rows(2)[1], dog)
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["tokens"] == ["<new1>", "<new2>"] and [c["token"] for c in manifest["concepts"]] == ["<new1>", "<new2>"]
    embeds = {token: load_file(str(out / name))[token] for token, name in manifest["token_files"].items()}
    assert set(embeds) == {"<new1>", "<new2>"} and not torch.equal(embeds["<new1>"][0], star) and not torch.equal(embeds["<new2>"][0], dog)
    loaded = load_backbone(str(tiny_dir))
    load_adapter(loaded, out)
    table = loaded.text_encoder.get_input_embeddings().weight
    for token in ("<new1>", "<new2>"):
        assert torch.equal(table[loaded.tokenizer.convert_tokens_to_ids(token)].detach(), embeds[token][0])
    for k, prompt in enumerate(("a photo of <new1> cat", "a <new2> pot")):
        paths = sample_run(compose("sample", [f"adapter={out}", f"prompt='{prompt}'", "steps=2", "num_images=1", "logger=none",
                                              f"output_dir={tmp_path / f'sample{k}'}", "progress=false"]))
        assert len(paths) == 1 and Image.open(paths[0]).size == (128, 128)


def make_concept_dirs(tmp_path: Path) -> list[dict[str, str]]:
    write_solid(tmp_path / "a", RED, 1), write_solid(tmp_path / "b", BLUE, 1), (tmp_path / "empty").mkdir()
    return [{"instance_dir": tmp_path / "a", "instance_prompt": "a photo of <new1> dog", "token": "<new1>"},
            {"instance_dir": tmp_path / "b", "instance_prompt": "a photo of <new2> pot", "token": "<new2>"}]


CD = ["method=custom_diffusion", "method.modifier_tokens=['<new1>','<new2>']"]


@pytest.mark.parametrize("change, extra, error, match", [
    ({"instance_dir": "missing"}, CD, FileNotFoundError, r"data\.concepts\[1\]\.instance_dir': folder .*missing not found"),
    ({"instance_dir": "empty"}, CD, SubjectDataError, r"data\.concepts\[1\]\.instance_dir': folder .*empty holds no images"),
    ({"instance_prompt": "a photo of a pot"}, CD, SubjectDataError, r"data\.concepts\[1\]\.instance_prompt'.*does not contain data\.concepts\[1\]\.token '<new2>'"),
    ({"token": "<new1>", "instance_prompt": "a <new1> pot"}, CD, SubjectDataError, r"data\.concepts\[1\]\.token': '<new1>' is already the token of data\.concepts\[0\]"),
    ({"token": "<new3>", "instance_prompt": "a <new3> pot"}, CD, SubjectDataError, r"data\.concepts\[1\]\.token': '<new3>' must be one of the tokens"),
    ({}, ["method=custom_diffusion", "method.modifier_tokens=['<new1>','<new2>','<new3>']"], SubjectDataError, r"\['<new3>'\] belong to no concept"),
    ({}, [*CD, "loss.prior_preservation=true"], SubjectDataError, r"data\.concepts\[0\]\.class_prompt' must be set"),
    ({"class_prompt": "a <new1> pot"}, [*CD, "loss.prior_preservation=true"], SubjectDataError, r"data\.concepts\[1\]\.class_prompt'.*must not contain"),
    ({"foo": "1"}, CD, ConfigError, r"data\.concepts\[1\]\.foo': not a concept key"),
    ({}, [*CD, "data.instance_prompt='x'"], SubjectDataError, r"data\.instance_prompt': set it per concept"),
    ({}, [*CD, "method.initializer_token=[cat,pot,dog]"], ConfigError, r"method\.initializer_token'.*one per modifier token"),
    ({}, ["method=textual_inversion", "method.tokens=['<new1>','<new2>']", "data.prompt_templates=object"], SubjectDataError, r"data\.concepts\[0\]\.subject' must be set"),
])
def test_bad_concepts_are_refused_before_anything_is_written(tmp_path, change, extra, error, match):
    entries = make_concept_dirs(tmp_path)
    entries[1] = {**entries[1], **{k: (tmp_path / v if k == "instance_dir" else v) for k, v in change.items()}}
    if "class_prompt" in change:
        entries[0]["class_prompt"] = "a photo of a dog"
    with pytest.raises(error, match=match):
        run(compose("personalize", [*extra, concepts_override(*entries), f"output_dir={tmp_path / 'run'}", "logger=none"]))
    assert not (tmp_path / "run").exists()


def test_an_empty_concept_list_is_refused(tmp_path):
    with pytest.raises(SubjectDataError, match=r"config key 'data\.concepts': is empty"):
        run(compose("personalize", ["data.concepts=[]", f"output_dir={tmp_path / 'run'}", "logger=none"]))


# ----------------------------------------------------------------------------- resize augmentation
def write_probe_images(directory: Path, size: tuple[int, int]) -> None:
    """Images whose red channel is their own loss mask (white left part, dark right part), green a constant
    (never the canvas's 0, so it shows where the image was pasted) and blue a ramp 40..250 across (a zoomed-in
    view shows only part of the ramp)."""
    directory.mkdir(parents=True, exist_ok=True)
    w, h = size
    red = np.full((h, w), 30, dtype=np.uint8)
    red[:, : w // 2] = 255
    blue = np.tile(np.linspace(40, 250, w).round().astype(np.uint8), (h, 1))
    Image.fromarray(np.stack([red, np.full((h, w), 200, np.uint8), blue], axis=-1)).save(directory / "img_0.png")
    Image.fromarray(red).save(directory / "img_0.mask.png")


@pytest.mark.parametrize("size, bucket_step", [((64, 64), None), ((80, 48), 16)])  # sizes the view keeps (no resize to cover)
def test_resize_augmentation_mask_is_the_valid_part_of_the_pasted_region_times_the_mask_file(tmp_path, size, bucket_step):
    write_probe_images(tmp_path / "subject", size)
    items = read_instance_items(tmp_path / "subject", masks=True)
    dataset = SubjectDataset([Concept(items, "a photo of sks cat")], 64, center_crop=False, flip_p=0.0, bucket_step=bucket_step,
                             resize_augmentation=True, vae_scale_factor=8)
    kinds = set()
    for i in range(40):
        example = dataset[i]
        pixels, mask = example["pixel_values"], example["loss_mask"]
        h, w = pixels.shape[-2:]
        assert mask.shape == (1, h, w) and example["latent_key"] == ""  # augmented views are never cached
        pasted = pixels[1] != 0  # green is 0 only on the canvas
        rows, cols = pasted.any(dim=1).nonzero()[:, 0], pasted.any(dim=0).nonzero()[:, 0]
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert pasted[top:bottom, left:right].all() and pasted.sum() == (bottom - top) * (right - left)  # one rectangle
        blue = (pixels[2][pasted] + 1) * 127.5
        zoomed_in = bool(pasted.all()) and float(blue.max() - blue.min()) < 0.9 * 210
        # diffusers' valid region, in latent pixels: rows top//8 + 1 .. bottom//8 - 1 (exclusive), same for columns
        valid = torch.zeros(h // 8, w // 8)
        if zoomed_in:
            valid[:] = 1
        else:
            valid[top // 8 + 1 : bottom // 8 - 1, left // 8 + 1 : right // 8 - 1] = 1
        assert valid.any()
        latent_mask = F.interpolate(mask[None], size=(h // 8, w // 8), mode="area")[0, 0]
        latent_valid = F.interpolate((mask > 0).float()[None], size=(h // 8, w // 8), mode="area")[0, 0]
        assert torch.equal(latent_valid > 0, valid > 0)
        # inside it the mask is the mask file's, scaled and placed as the image was (red channel = mask)
        expected = torch.kron(valid, torch.ones(8, 8)) * (pixels[0] + 1) / 2
        assert torch.allclose(mask[0], expected, atol=1e-5)
        assert torch.allclose(latent_mask, F.interpolate(expected[None, None], size=(h // 8, w // 8), mode="area")[0, 0], atol=1e-5)

        # the caption says how far the view was scaled: s (of 64) from the pasted width, "far" below 0.6 * 64
        s = (right - left) * 64 / w
        kind = "in" if zoomed_in else "far" if s < 0.6 * 64 else "near"
        prefixes = {"in": ZOOM_IN_PREFIXES, "far": ZOOM_OUT_PREFIXES, "near": ("",)}[kind]
        assert example["prompt"] in [p + "a photo of sks cat" for p in prefixes]
        kinds.add(kind)
    assert kinds == {"in", "far", "near"}


def test_the_masked_loss_ignores_latents_outside_the_valid_region(tmp_path, fresh_backbone):
    write_probe_images(tmp_path / "subject", (64, 64))
    (tmp_path / "subject" / "img_0.mask.png").unlink()
    cfg = validate_config(compose("personalize", [
        "method=lora", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'",
        "data.resize_augmentation=true", f"output_dir={tmp_path}", "logger=none",
    ]))
    module = MODULES["lora"](OmegaConf.to_container(cfg), fresh_backbone)
    dataset = SubjectDataset([Concept(read_instance_items(tmp_path / "subject"), "a photo of sks cat")], 64, flip_p=0.0, resize_augmentation=True)
    index = next(i for i in range(50) if dataset[i]["loss_mask"].mean() < 0.5)  # a zoomed-out view
    batch = torch.utils.data.default_collate([dataset[index]])
    valid = F.interpolate(batch["loss_mask"], size=(8, 8), mode="area")[0, 0] > 0.5

    outputs = []

    def keep_output(module_, args, output):
        output.sample.retain_grad()
        outputs.append(output.sample)

    handle = fresh_backbone.unet.register_forward_hook(keep_output)
    results = {}
    for masked in (True, False):
        b = batch if masked else {k: v for k, v in batch.items() if k != "loss_mask"}
        module.seed_micro_batch(b)
        loss, _ = module.compute_loss(b)
        loss.backward()
        results[masked] = (loss.detach(), outputs[-1].grad.clone())
    handle.remove()
    (loss, grad), (_, unmasked_grad) = results[True], results[False]
    assert torch.all(grad[..., ~valid] == 0) and torch.all(grad[..., valid] != 0)
    assert torch.all(unmasked_grad[..., ~valid] != 0)
    diff = unmasked_grad * unmasked_grad.numel() / 2  # d mean(e^2) / d pred = 2 e / numel
    assert torch.allclose(loss, diff[..., valid].square().mean(), rtol=1e-4)


# ----------------------------------------------------------------------------- resume
def test_resume_is_exact_with_concepts_prior_buckets_resize_augmentation_caching_and_ema(tmp_path):
    from lightning.pytorch.callbacks import Callback
    from safetensors.torch import load_file

    write_solid(tmp_path / "cat", RED, 3, size=(96, 64)), write_solid(tmp_path / "pot", BLUE, 2, size=(64, 96))
    write_solid(tmp_path / "cats", GREEN, 2), write_solid(tmp_path / "pots", YELLOW, 2)

    class Crash(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                raise RuntimeError("simulated crash")

    extra = [
        *CD, "logger=none", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "data.batch_size=2", "data.resolution=64",
        "data.buckets=true", "data.bucket_step=16", "data.center_crop=false", "data.resize_augmentation=true", "ema.enabled=true",
        "ema.decay=0.9", "method.lr=1e-3", "loss.prior_preservation=true", "data.num_class_images=2",
        concepts_override(
            {"instance_dir": tmp_path / "cat", "instance_prompt": "a photo of <new1> cat", "token": "<new1>", "class_dir": tmp_path / "cats", "class_prompt": "a cat"},
            {"instance_dir": tmp_path / "pot", "instance_prompt": "a <new2> pot", "token": "<new2>", "class_dir": tmp_path / "pots", "class_prompt": "a pot"},
        ),
    ]
    straight = run(compose("personalize", [*extra, f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose("personalize", [*extra, f"output_dir={tmp_path / 'b'}"]), callbacks=[Crash()])
    resumed = run(compose("personalize", [*extra, f"output_dir={tmp_path / 'b'}", "ckpt_path=last"]))

    for name in ("pytorch_custom_diffusion_weights.safetensors", "learned_embeds.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert ca["ema"]["updates"] == cb["ema"]["updates"] == 4
    assert all(torch.equal(ca["ema"]["shadow"][k], cb["ema"]["shadow"][k]) for k in ca["ema"]["shadow"])
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])


def test_class_images_use_their_own_caption_files(tmp_path):
    """Regularization images with captions (kohya's layout): a caption file replaces the class prompt for its image."""
    write_solid(tmp_path / "dog", RED, 1)
    dogs = write_solid(tmp_path / "dogs", GREEN, 3)  # red channel 30, 20, 10 tells img_0, img_1, img_2 apart
    (dogs / "img_0.txt").write_text("a dog on grass\n")
    (dogs / "img_2.txt").write_text("a dog, sleeping")
    base = [f"data.instance_dir={tmp_path / 'dog'}", "data.instance_prompt='a photo of sks dog'", f"data.class_dir={dogs}",
            "data.class_prompt='a photo of a dog'", "data.num_class_images=3", "loss.prior_preservation=true"]
    expected = {30: "a dog on grass", 20: "a photo of a dog", 10: "a dog, sleeping"}
    for captions in (True, False):
        cfg = compose("personalize", [*base, f"data.captions={captions}"]).data
        module = SubjectDataModule(cfg, validate_subject_data(cfg, prior_preservation=True), 64, prior_preservation=True)
        module.setup()
        dataset = module.dataset()
        seen = {}
        for i in range(9):
            red = colour(dataset[i]["class_pixel_values"])[0]
            seen[red] = dataset[i]["class_prompt"]
        assert seen == (expected if captions else dict.fromkeys(expected, "a photo of a dog"))

    (dogs / "img_1.txt").write_text("")
    cfg = compose("personalize", base).data
    module = SubjectDataModule(cfg, validate_subject_data(cfg, prior_preservation=True), 64, prior_preservation=True)
    with pytest.raises(SubjectDataError, match=r"img_1\.txt: is empty \(delete it to use data\.class_prompt\)"):
        module.setup()
    (dogs / "img_1.txt").write_text("a sks dog")  # the trained token in a class caption would teach it the class
    with pytest.raises(SubjectDataError, match=r"img_1\.txt.*'sks'"):
        validate_subject_data(cfg, ["sks"], prior_preservation=True)
