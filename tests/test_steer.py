"""DreamSteerer steering over the four baselines: what changes, what stays the pre-trained model, the
steered export (reloaded through diffusers' own loaders), and bad input failing before any compute."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from dreamsteer.checkpoints import AdapterLoadError, export_adapter, load_adapter
from dreamsteer.checkpoints.adapter_io import sha256_file
from dreamsteer.checkpoints.formats import CD_FILE, custom_diffusion_processors
from dreamsteer.data.images import ImageLoadError
from dreamsteer.diffusion.adapters import attach_adapter
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.distill.guided_sampling import cfg_eps
from dreamsteer.lit_modules.dreamsteerer import DreamSteererModule, EDSDConfig, MaskConfig, ModeShiftConfig, OptimConfig
from dreamsteer.train.config import compose
from dreamsteer.train.steer import SteerConfig, concept_tokens, infer_class_token, run

SOURCE = "a photo of a cat next to a mirror"
PARENTS = {  # kind: (attach config, instance prompt, ref prompt)
    "lora": (dict(rank=4), "a photo of sks cat", "a photo of a sks cat next to a mirror"),
    "textual_inversion": (dict(tokens=["<sks>"], initializer_token="cat"), "a photo of <sks>", "a photo of a <sks> next to a mirror"),
    "custom_diffusion": (dict(modifier_tokens=["<new1>"], initializer_token="cat"), "a photo of <new1> cat",
                         "a photo of a <new1> cat next to a mirror"),
    "dreambooth": (dict(), "a photo of sks cat", "a photo of a sks cat next to a mirror"),
}
FAST = [  # the demo's kind of settings, smaller still
    "steps=2", "mode_shift.n_ms=1", "mode_shift.sampling_steps=2", "mode_shift.end=0.5", "mask.timesteps=[300]",
    "progress=false",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from dreamsteer.data.samples import write_sample_images

    root = tmp_path_factory.mktemp("steer")
    write_sample_images(root / "photos", ["cat"])
    return root


_parents: dict[tuple[str, Path], Path] = {}


def personalized_export(kind: str, tiny_dir: Path, out: Path, extra: dict | None = None) -> tuple[Path, Any]:
    """`kind` attached and moved off its init, as training would, exported to `out` with `extra` in adapter.json;
    returns the export and the backbone."""
    config, instance, _ = PARENTS[kind]
    bb = load_backbone(str(tiny_dir))
    attach_adapter(bb, kind, **config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.adapter.trainable_parameters(bb):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return export_adapter(bb, out, {"instance_prompt": instance, "training_steps": 5, **(extra or {})}), bb


def parent(kind: str, tiny_dir: Path, root: Path) -> Path:
    """A "personalized" export of `kind`, made once per module."""
    if (kind, tiny_dir) not in _parents:
        _parents[kind, tiny_dir] = personalized_export(kind, tiny_dir, root / f"parent_{kind}_{tiny_dir.name}")[0]
    return _parents[kind, tiny_dir]


def _params(bb) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (("unet", bb.unet), ("text_encoder", bb.text_encoder), ("vae", bb.vae)):
        out.update({f"{prefix}.{n}": p.detach().clone() for n, p in module.named_parameters()})
    return out


def _steer(kind: str, tiny_dir: Path, root: Path, out: Path, extra: list[str] = (), adapter: Path | None = None) -> Path:
    _, _, ref = PARENTS[kind]
    overrides = [f"adapter={adapter or parent(kind, tiny_dir, root)}", f"image={root / 'photos' / 'cat.png'}", f"source_prompt='{SOURCE}'",
                 f"ref_prompt='{ref}'", f"output_dir={out}", f"model.pretrained={tiny_dir}", *FAST, *extra]
    return run(compose("steer", overrides))


@pytest.mark.parametrize("kind", list(PARENTS))
def test_steer_changes_only_the_baselines_parameters_and_reloads_through_diffusers(kind, tiny_dir, workdir, tmp_path):
    from diffusers import StableDiffusionPipeline

    logger = ["logger=tensorboard", "mode_shift.log_unguided=true"] if kind == "lora" else ["logger=none"]
    steered = _steer(kind, tiny_dir, workdir, tmp_path / "run", logger)
    assert steered == tmp_path / "run" / "adapter"

    # adapter.json records the steering
    manifest = json.loads((steered / "adapter.json").read_text())
    info = manifest["steering"]
    assert manifest["method"] == kind and info["steps"] == 2
    assert info["source_image_sha256"] == sha256_file(workdir / "photos" / "cat.png")
    assert info["source_prompt"] == SOURCE and info["ref_prompt"] == PARENTS[kind][2] and info["class_token"] == "cat"
    assert info["config"]["edsd"]["jacobian"] == -1.0 and info["config"]["mode_shift"]["n_ms"] == 1
    assert manifest["instance_prompt"] == PARENTS[kind][1] and manifest["training_steps"] == 5

    # only the baseline's own trainable state moved
    before_bb, after_bb = load_backbone(str(tiny_dir)), load_backbone(str(tiny_dir))
    load_adapter(before_bb, parent(kind, tiny_dir, workdir))
    load_adapter(after_bb, steered)
    trainable = {n for n, _ in after_bb.adapter.named_trainable(after_bb)}
    before, after = _params(before_bb), _params(after_bb)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    if kind != "dreambooth":  # every LoRA / TI / CD tensor gets a gradient; DreamBooth: most of the UNet
        assert changed == trainable
    else:
        assert len(changed) > 0.8 * len(trainable)

    # diffusers' own loaders read the steered export and compute what our loader computes
    prompt = PARENTS[kind][2]
    if kind == "dreambooth":
        pipe = StableDiffusionPipeline.from_pretrained(str(steered))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        if kind == "lora":
            pipe.load_lora_weights(str(steered))
        else:
            for name in manifest["token_files"].values():
                pipe.load_textual_inversion(str(steered / name))
        if kind == "custom_diffusion":
            pipe.unet.set_attn_processor(custom_diffusion_processors(pipe.unet, steered / CD_FILE))
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([400])
    with torch.no_grad():
        theirs = pipe.unet(z, t, encoder_hidden_states=pipe.encode_prompt([prompt], "cpu", 1, False)[0]).sample
        ours = after_bb.unet(z, t, encoder_hidden_states=after_bb.encode_prompt([prompt])).sample
    tol = 1e-5 if kind == "custom_diffusion" else 0.0  # diffusers' CD processor computes attention its own way
    assert torch.allclose(theirs, ours, atol=tol, rtol=0), (theirs - ours).abs().max()

    out = tmp_path / "run"
    assert (out / "mask.png").is_file() and (out / "mode_shift_guided.png").is_file()
    assert (out / "mode_shift_unguided.png").is_file() == (kind == "lora")  # log_unguided: off unless asked for
    if kind == "lora":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        assert {"mask/binary", "mode_shift/guided", "mode_shift/guided_vs_unguided"} <= set(events.Tags()["images"])
        assert {"steer/edsd", "steer/mode_shift", "steer/loss"} <= set(events.Tags()["scalars"])


def test_steer_over_a_lora_on_sdxl_exports_what_diffusers_sdxl_pipeline_reloads(tiny_sdxl_dir, workdir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    steered = _steer("lora", tiny_sdxl_dir, workdir, tmp_path / "run", ["logger=none"])
    before_bb, after_bb = load_backbone(str(tiny_sdxl_dir)), load_backbone(str(tiny_sdxl_dir))
    load_adapter(before_bb, parent("lora", tiny_sdxl_dir, workdir))
    load_adapter(after_bb, steered)
    assert after_bb.family.name == "sdxl"
    before, after = dict(before_bb.adapter.named_trainable(before_bb)), dict(after_bb.adapter.named_trainable(after_bb))
    assert before.keys() == after.keys() and all(not torch.equal(before[n], after[n]) for n in before)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    pipe.load_lora_weights(str(steered))
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([400])
    prompt = PARENTS["lora"][2]
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
        theirs = pipe.unet(z, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        ours = after_bb.predict_eps(z, t, after_bb.encode_prompt([prompt]))
        base = before_bb.predict_eps(z, t, before_bb.encode_prompt([prompt]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - base).abs().max() > 1e-6  # steering moved the prediction


def _module(bb, kind: str, z_src: torch.Tensor) -> DreamSteererModule:
    return DreamSteererModule(bb, z_src, SOURCE, PARENTS[kind][2], "cat", EDSDConfig(),
                              ModeShiftConfig(n_ms=1, sampling_steps=2, log_unguided=False), MaskConfig(timesteps=[300]),
                              OptimConfig(lr={kind: 1e-2}), progress=False)


@pytest.mark.parametrize("kind", list(PARENTS))
def test_pretrained_branch_is_exactly_the_base_model(kind, tiny_dir, tiny_backbone, workdir):
    """After a steering step has moved the adapter, the EDSD target still equals the base model's CFG
    prediction bit for bit (the adapter is really off), while the adapter is on outside it."""
    bb = load_backbone(str(tiny_dir))
    load_adapter(bb, parent(kind, tiny_dir, workdir))
    gen = torch.Generator().manual_seed(2)
    module = _module(bb, kind, torch.randn(1, 4, 16, 16, generator=gen))
    module.on_fit_start()
    optimizer = module.configure_optimizers()
    module.steering_loss(0)["loss"].backward()
    optimizer.step()

    x, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([321])
    with torch.no_grad():
        emb = tiny_backbone.encode_prompt([SOURCE, ""])
        base = cfg_eps(tiny_backbone, x, t, emb[:1], emb[1:], 7.5)
        base_plain = tiny_backbone.predict_eps(x, t, emb[:1])
        adapted = cfg_eps(bb, x, t, *bb.encode_prompt([module.ref_prompt, ""]).chunk(2), 7.5)
        base_ref = cfg_eps(tiny_backbone, x, t, *tiny_backbone.encode_prompt([PARENTS[kind][2], ""]).chunk(2), 7.5)
    plain, guided = module.target_eps(x, t)
    assert torch.equal(guided, base) and torch.allclose(plain, base_plain, rtol=0, atol=1e-5)
    assert not torch.allclose(adapted, base_ref, atol=1e-4)  # the personalized branch really is personalized


@pytest.mark.filterwarnings("ignore:.*eval mode")
def test_mode_shift_images_are_regenerated_every_k_steps_and_lambda_zero_is_edsd_alone(tiny_dir, workdir):
    import lightning as L

    def fit(module: DreamSteererModule, steps: int) -> None:
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.arange(steps), batch_size=1))

    bb = load_backbone(str(tiny_dir))
    load_adapter(bb, parent("lora", tiny_dir, workdir))
    z_src = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    module = DreamSteererModule(bb, z_src, SOURCE, PARENTS["lora"][2], "cat", EDSDConfig(),
                                ModeShiftConfig(n_ms=1, sampling_steps=2, regenerate_every=1, log_unguided=False),
                                MaskConfig(enabled=False), OptimConfig(), progress=False)
    seen = []
    regenerate = module._regenerate
    module._regenerate = lambda round_index: (regenerate(round_index), seen.append(module.ms_latents))
    fit(module, 3)
    assert module.ms_rounds == 3  # at the start, then before steps 1 and 2
    assert not torch.equal(seen[0], seen[-1])  # new noise and an updated model
    assert module.subject is None  # mask disabled: M = 1

    alone = DreamSteererModule(bb, z_src, SOURCE, PARENTS["lora"][2], "cat", EDSDConfig(), ModeShiftConfig(lambda_ms=0.0),
                               MaskConfig(enabled=False), OptimConfig(), progress=False)
    fit(alone, 1)
    assert alone.ms_rounds == 0 and alone.ms_latents is None
    assert "mode_shift" not in alone.steering_loss(0)


def test_bad_input_fails_before_any_compute(tiny_dir, workdir, tmp_path, monkeypatch):
    import dreamsteer.train.steer as steer

    def no_compute(*args, **kwargs):
        raise AssertionError("steering compute started before the input was checked")

    monkeypatch.setattr(steer, "DreamSteererModule", no_compute)
    lora = parent("lora", tiny_dir, workdir)
    photo = workdir / "photos" / "cat.png"
    base = [f"image={photo}", f"source_prompt='{SOURCE}'", f"output_dir={tmp_path}", *FAST]

    def attempt(*overrides: str) -> None:
        steer.run(compose("steer", [*base, *overrides]))

    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        attempt(f"adapter={tmp_path / 'no_such_dir'}", "ref_prompt='a photo of a sks cat'")
    with pytest.raises(ValueError, match="concept"):
        attempt(f"adapter={lora}", "ref_prompt='a photo of a cat next to a mirror'")
    with pytest.raises(ValueError, match="concept token"):
        attempt(f"adapter={parent('textual_inversion', tiny_dir, workdir)}", "ref_prompt='a photo of a sks cat next to a mirror'")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        attempt(f"adapter={lora}", "ref_prompt='a photo of a sks cat next to a mirror'", f"image={broken}")
    with pytest.raises(ValueError, match="class token 'dog'"):
        attempt(f"adapter={lora}", "ref_prompt='a photo of a sks cat next to a mirror'", "class_token=dog")
    with pytest.raises(ValueError, match="edsd.jacobian|jacobian"):
        attempt(f"adapter={lora}", "ref_prompt='a photo of a sks cat next to a mirror'", "edsd.jacobian=2")
    # an adapter trained on another base model (tiny seed 0) onto tiny seed 1
    with pytest.raises(AdapterLoadError, match="base model"):
        attempt(f"adapter={lora}", "ref_prompt='a photo of a sks cat next to a mirror'", "model.pretrained=tiny:1")
    assert not (tmp_path / "adapter").exists()


def test_concept_and_class_tokens_are_read_from_the_adapter_and_prompts(tmp_path):
    assert concept_tokens({"tokens": ["<sks>"]}, None, tmp_path, SOURCE, "x") == ["<sks>"]
    assert concept_tokens({"tokens": [], "instance_prompt": "a photo of sks cat", "class_prompt": "a photo of cat"}, None, tmp_path, "", "") == ["sks"]
    assert concept_tokens({"instance_prompt": "a photo of sks cat"}, None, tmp_path, SOURCE, "a photo of a sks cat next to a mirror") == ["sks"]
    assert concept_tokens({}, "zwx", tmp_path, SOURCE, "") == ["zwx"]
    with pytest.raises(ValueError, match="concept_token"):
        concept_tokens({}, None, tmp_path, SOURCE, "a photo of a sks cat")
    assert infer_class_token(SOURCE, "a photo of a sks cat next to a mirror") == "cat"
    assert infer_class_token(SOURCE, "a photo of a <sks> next to a mirror") == "cat"
    assert infer_class_token("a yellow circle on a white background", "a sks circle on a white background") == "yellow circle"
    with pytest.raises(ValueError, match="class_token"):
        infer_class_token("a photo of a cat", "a photo of a cat by <sks>")


def test_steer_yaml_mirrors_the_schema_defaults():
    """conf/steer.yaml and the dataclass defaults say the same (the docs quote both)."""
    cfg = OmegaConf.to_container(compose("steer", []))
    defaults = asdict(SteerConfig())
    for section in ("edsd", "mode_shift", "mask", "memory", "optim"):
        assert cfg[section] == defaults[section], section
    for key in ("steps", "seed", "export_name", "class_token", "concept_token"):
        assert cfg[key] == defaults[key], key


def test_multi_vector_textual_inversion_prompt_reaches_the_text_encoder_expanded_once(fresh_backbone):
    """With num_vectors=3, y_ref holds each of the placeholder's three rows exactly once (the module keeps the
    prompt as written; `Backbone.tokenize` expands it)."""
    bb = fresh_backbone
    attach_adapter(bb, "textual_inversion", tokens=["<sks>"], initializer_token="cat", num_vectors=3)
    ref = "a photo of a <sks> next to a mirror"
    module = DreamSteererModule(bb, torch.zeros(1, 4, 16, 16), SOURCE, ref, "cat", EDSDConfig(), ModeShiftConfig(lambda_ms=0.0),
                                MaskConfig(enabled=False), OptimConfig(), progress=False)
    seen = []
    encoder = bb.text_encoder.forward
    bb.text_encoder.forward = lambda ids, *a, **k: (seen.append(ids), encoder(ids, *a, **k))[1]
    with torch.no_grad():
        y_ref, _ = module.encode_ref()
    ids = seen[0][0].tolist()
    expected = bb.tokenizer("a photo of a <sks> <sks>_1 <sks>_2 next to a mirror", padding="max_length",
                            max_length=bb.tokenizer.model_max_length).input_ids
    assert ids == expected
    for tok in ("<sks>", "<sks>_1", "<sks>_2"):
        assert ids.count(bb.tokenizer.convert_tokens_to_ids(tok)) == 1, tok


def test_steering_defaults_agree_with_the_editor_and_personalization():
    """The subject mask of steering is the mask dds_sm edits with, and each baseline steers at its own
    personalization learning rate."""
    steer_cfg = compose("steer", [])
    dds_sm = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "editor" / "dds_sm.yaml")
    assert steer_cfg.mask.dilation == dds_sm.mask_dilation
    assert steer_cfg.mask.threshold == dds_sm.mask_threshold
    assert list(steer_cfg.mask.timesteps) == list(dds_sm.mask_timesteps)
    assert list(steer_cfg.mask.divisors) == list(dds_sm.mask_divisors)
    for kind, lr in steer_cfg.optim.lr.items():
        method = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "method" / f"{kind}.yaml")
        assert lr == method.lr, kind
    assert steer_cfg.mode_shift.log_unguided is False  # a full extra sampling run: the demo alone turns it on


def test_steering_runs_at_the_learning_rate_the_adapter_was_trained_with(tiny_dir, workdir, tmp_path):
    """Adam's first step moves every parameter with a gradient by the learning rate itself, so the largest change
    of the LoRA's weights after one step reads the rate the optimizer ran at."""
    trained_lr = 3e-3  # 30x the LoRA default of optim.lr, which an adapter trained by personalize at 3e-3 must not get
    src, bb = personalized_export("lora", tiny_dir, tmp_path / "trained", {"training": {"method": {"name": "lora", "lr": trained_lr}}})
    before = {n: p.detach().clone() for n, p in bb.adapter.named_trainable(bb)}

    def one_step(out: Path, extra: list[str]) -> tuple[float, dict]:
        steered = _steer("lora", tiny_dir, workdir, out, ["logger=none", "steps=1", *extra], adapter=src)
        after = load_backbone(str(tiny_dir))
        load_adapter(after, steered)
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in after.adapter.named_trainable(after))
        return moved, json.loads((steered / "adapter.json").read_text())

    moved, manifest = one_step(tmp_path / "own", [])
    assert moved == pytest.approx(trained_lr, rel=0.02)
    assert manifest["steering"]["lr"] == trained_lr and manifest["steering"]["lr_source"] == "adapter"
    assert manifest["training"]["method"]["lr"] == trained_lr  # carried: steering the steered adapter again keeps the rate

    moved, manifest = one_step(tmp_path / "config", ["optim.lr_from_adapter=false"])
    assert moved == pytest.approx(1e-4, rel=0.02)
    assert manifest["steering"]["lr"] == 1e-4 and manifest["steering"]["lr_source"] == "config"


def test_the_trained_learning_rate_is_read_only_from_a_well_formed_record():
    from dreamsteer.train.steer import trained_learning_rate

    assert trained_learning_rate({"training": {"method": {"lr": 2e-4}}}) == 2e-4
    for manifest in ({}, {"training": None}, {"training": []}, {"training": {"method": "lora"}}, {"training": {"method": {"lr": "fast"}}},
                     {"training": {"method": {"lr": 0}}}, {"training": {"method": {"lr": True}}}):
        assert trained_learning_rate(manifest) is None, manifest
