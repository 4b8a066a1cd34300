"""Personalization LightningModules and the `personalize` task on the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from dreamsteer.data.images import list_images
from dreamsteer.data.samples import write_subject_set
from dreamsteer.data.subject import Concept, SubjectDataset, read_instance_items
from dreamsteer.lit_modules.personalize import MODULES
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run, validate_config

PROMPTS = {
    "dreambooth": "a photo of sks cat",
    "lora": "a photo of sks cat",
    "textual_inversion": "a photo of <sks> cat",
    "custom_diffusion": "a photo of <new1> cat",
}


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("subject")
    write_subject_set(directory, "cat", count=3)
    return directory


def overrides(method: str, subject_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"method={method}", f"data.instance_dir={subject_dir}", f"data.instance_prompt='{PROMPTS[method]}'",
        f"output_dir={out}", "logger=none", "trainer.log_every_n_steps=1", *extra,
    ]


def make_module(method: str, subject_dir: Path, out: Path, backbone, *extra: str):
    cfg = validate_config(compose("personalize", overrides(method, subject_dir, out, *extra)))
    return MODULES[method](OmegaConf.to_container(cfg), backbone), cfg


def fixed_batch(cfg, items=None, count: int = 2, class_paths=()) -> dict:
    concept = Concept(items or read_instance_items(cfg.data.instance_dir), cfg.data.instance_prompt,
                      class_paths=class_paths, class_prompt="a photo of a cat" if class_paths else None)
    dataset = SubjectDataset([concept], 128, seed=0)
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


def image_paths(directory: Path) -> list[Path]:
    return [item.path for item in read_instance_items(directory)]


def named_params(backbone) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{n}": p
        for prefix, module in (("unet", backbone.unet), ("text_encoder", backbone.text_encoder), ("vae", backbone.vae))
        for n, p in module.named_parameters()
    }


LR = {"dreambooth": 3e-4, "lora": 3e-3, "textual_inversion": 5e-2, "custom_diffusion": 1e-3}


@pytest.mark.parametrize("method", list(PROMPTS))
def test_fixed_batch_steps_lower_the_loss_and_train_only_the_adapter(method, subject_dir, fresh_backbone, tmp_path):
    module, cfg = make_module(method, subject_dir, tmp_path, fresh_backbone)
    backbone = module.backbone
    intended = {name for name, _ in backbone.adapter.named_trainable(backbone)}
    assert all(p.dtype == torch.float32 for _, p in backbone.adapter.named_trainable(backbone))
    before = {n: p.detach().clone() for n, p in named_params(backbone).items()}
    table_before = backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    batch = fixed_batch(cfg)
    optimizer = torch.optim.AdamW(backbone.adapter.trainable_parameters(backbone), lr=LR[method], weight_decay=1e-2)
    module.train()
    losses = []
    for _ in range(4):
        module.seed_micro_batch(batch)  # the same (t, eps) every step: a fixed objective
        loss, _ = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    module.seed_micro_batch(batch)
    losses.append(module.compute_loss(batch)[0].item())
    assert losses[-1] < losses[0], losses

    after = named_params(backbone)
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed and changed <= intended, sorted(changed - intended)[:5]
    if method == "textual_inversion":
        table = backbone.text_encoder.get_input_embeddings().weight.detach()
        assert torch.equal(table[: table_before.shape[0] - 1], table_before[:-1])  # every other row, bit-exact
        assert changed == intended
    if method == "custom_diffusion":
        assert all(".attn2.to_k." in n or ".attn2.to_v." in n or n.endswith("token_embedding.new") for n in changed)
        assert any(n.endswith("token_embedding.new") for n in changed)
    if method == "lora":
        assert all(".lora_" in n for n in changed)


def test_loss_is_the_formula_for_v_prediction_min_snr_offset_noise_and_prior(subject_dir, fresh_backbone, tmp_path):
    from diffusers import DDPMScheduler

    fresh_backbone.scheduler = DDPMScheduler.from_config(fresh_backbone.scheduler.config, prediction_type="v_prediction")
    module, cfg = make_module(
        "lora", subject_dir, tmp_path, fresh_backbone,
        "loss.snr_gamma=5.0", "loss.noise_offset=0.1", "loss.prior_loss_weight=0.5", "loss.min_timestep=100", "loss.max_timestep=900",
    )
    with torch.no_grad():  # a non-zero LoRA so the adapter takes part
        for p in fresh_backbone.adapter.trainable_parameters(fresh_backbone):
            p.add_(0.02)
    batch = fixed_batch(cfg, class_paths=image_paths(subject_dir))
    module.seed_micro_batch(batch)
    loss, parts = module.compute_loss(batch)

    module.seed_micro_batch(batch)  # replay the same draws by hand, in the same order
    b = fresh_backbone
    pixels = torch.cat([batch["pixel_values"], batch["class_pixel_values"]])
    with torch.no_grad():
        z = b.vae.encode(pixels).latent_dist.sample() * b.vae.config.scaling_factor
    eps = torch.randn(z.shape) + 0.1 * torch.randn(z.shape[0], z.shape[1], 1, 1)
    t = torch.randint(100, 900, (z.shape[0],))
    a = b.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    with torch.no_grad():
        emb = b.text_encoder(b.tokenize(list(batch["prompt"]) + list(batch["class_prompt"])))[0]
        v_pred = b.unet(z_t, t, encoder_hidden_states=emb).sample
    target = a.sqrt() * eps - (1 - a).sqrt() * z
    snr = (a / (1 - a)).reshape(-1)
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    per = w * (v_pred - target).square().mean(dim=(1, 2, 3))
    expected = per[:2].mean() + 0.5 * per[2:].mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=0), (loss.item(), expected.item())
    assert torch.allclose(parts["loss/prior"], per[2:].mean(), rtol=1e-5)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_vae_latent_mean_denoises_the_posterior_mean_and_draws_no_vae_noise(subject_dir, fresh_backbone, tmp_path, cache):
    module, cfg = make_module("lora", subject_dir, tmp_path, fresh_backbone, "loss.vae_latent=mean", f"cache.latents={cache}")
    batch = fixed_batch(cfg)
    module.seed_micro_batch(batch)
    loss, _ = module.compute_loss(batch)

    module.seed_micro_batch(batch)  # replay: the first draw is the noise, not a posterior sample
    b = fresh_backbone
    with torch.no_grad():
        dist = b.vae.encode(batch["pixel_values"]).latent_dist
        assert dist.std.min() > 1e-3  # a sample would differ from the mean
        z = dist.mean * b.vae.config.scaling_factor
        eps = torch.randn(z.shape)
        t = torch.randint(0, b.num_train_timesteps, (z.shape[0],))
        a = b.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        emb = b.text_encoder(b.tokenize(list(batch["prompt"])))[0]
        pred = b.unet(z_t, t, encoder_hidden_states=emb).sample
    expected = (pred - eps).square().mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=0), (loss.item(), expected.item())


def test_bad_vae_latent_is_a_config_error(subject_dir, tmp_path):
    with pytest.raises(ConfigError, match="loss.vae_latent"):
        validate_config(compose("personalize", overrides("lora", subject_dir, tmp_path, "loss.vae_latent=mode")))


class Crash(Callback):
    """Kills the run when it reaches `step` optimizer steps (after that step's checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_interrupted_then_resumed_run_equals_uninterrupted_and_checkpoints_are_trimmed(subject_dir, tmp_path):
    from safetensors.torch import load_file

    from dreamsteer.train.export import run as export_run

    extra = (
        "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.checkpoint_every_n_steps=2",
        "optim.scheduler=linear", "method.dropout=0.1", "data.center_crop=false", "method.lr=1e-3",
    )
    straight = run(compose("personalize", overrides("lora", subject_dir, tmp_path / "a", *extra)))

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose("personalize", overrides("lora", subject_dir, tmp_path / "b", *extra)), callbacks=[Crash(2)])
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert not (tmp_path / "b" / "adapter").exists()
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    lora_names = set(checkpoint["state_dict"])
    assert lora_names and all(".lora_" in n for n in lora_names)  # frozen weights never in the checkpoint ...
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(lora_names)  # ... nor in the optimizer

    resumed = run(compose("personalize", overrides("lora", subject_dir, tmp_path / "b", *extra, "ckpt_path=last")))
    a, b = load_file(str(straight / "pytorch_lora_weights.safetensors")), load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "a" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(first[k], torch.zeros_like(first[k])) for k in first if "lora.up" in k or "lora_B" in k)

    exported = export_run(compose("export", [f"ckpt={tmp_path / 'b'}", f"dir={tmp_path / 'from_ckpt'}"]))
    c = load_file(str(exported / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert (exported / "lora_kohya.safetensors").is_file()


def test_prior_preservation_generates_class_images_and_logs_validation_samples(subject_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(compose("personalize", [
        *overrides("dreambooth", subject_dir, tmp_path, "trainer.max_steps=2", "data.batch_size=1"),
        "logger=tensorboard", "loss.prior_preservation=true", "data.class_prompt='a photo of a cat'",
        "data.num_class_images=2", "data.class_steps=1", "data.class_batch_size=2",
        "validation.every_n_steps=2", "validation.steps=1", "validation.num_images=1",
    ]))
    assert len(list_images(tmp_path / "class_images")) == 2
    manifest = OmegaConf.load(out / "adapter.json")
    assert manifest.class_prompt == "a photo of a cat" and manifest.training_steps == 2 and manifest.method == "dreambooth"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert any(tag.startswith("validation/") for tag in events.Tags()["images"])
    assert "train/loss" in events.Tags()["scalars"]


def test_bf16_mixed_with_8bit_adamw_and_gradient_checkpointing_keeps_trainable_fp32(subject_dir, tmp_path):
    out = run(compose("personalize", overrides(
        "custom_diffusion", subject_dir, tmp_path, "model.dtype=bf16", "trainer.precision=bf16-mixed",
        "optim.name=adamw8bit", "gradient_checkpointing=true", "trainer.max_steps=2", "method.lr=1e-3",
    )))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # bitsandbytes' 8-bit moments (tensors >= 4096 values)
    assert (out / "pytorch_custom_diffusion_weights.safetensors").is_file()

    with pytest.raises(ConfigError, match="trainer.precision"):
        run(compose("personalize", overrides("lora", subject_dir, tmp_path / "x", "model.dtype=bf16")))


def _broken_dir(subject_dir: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "broken"
    write_subject_set(directory, "cat", count=1)
    (directory / "zz_broken.png").write_bytes(b"not an image at all")
    return directory


BAD_INPUTS = {
    "instance dir not set": (lambda s, t: ["method=lora"], ValueError, "data.instance_dir' must be set"),
    "missing instance dir": (lambda s, t: ["method=lora", f"data.instance_dir={t / 'nope'}"], FileNotFoundError, "not found"),
    "empty instance dir": (lambda s, t: ["method=lora", f"data.instance_dir={(t / 'empty').mkdir() or t / 'empty'}"], ValueError, "holds no images"),
    "unreadable image": (lambda s, t: ["method=lora", f"data.instance_dir={_broken_dir(s, t)}"], ValueError, "zz_broken.png"),
    "TI prompt without its token": (
        lambda s, t: ["method=textual_inversion", f"data.instance_dir={s}", "data.instance_prompt='a photo of a cat'"],
        ValueError, "does not contain the token '<sks>'"),
    "CD prompt without its token": (
        lambda s, t: ["method=custom_diffusion", f"data.instance_dir={s}", "data.instance_prompt='a photo of a cat'"],
        ValueError, "does not contain the token '<new1>'"),
    "placeholder already in vocabulary": (
        lambda s, t: ["method=textual_inversion", f"data.instance_dir={s}", "data.instance_prompt='a photo of sks'", "method.tokens=[sks]"],
        ValueError, "already exists in the tokenizer's vocabulary"),
    "resolution not a multiple of the VAE factor": (
        lambda s, t: ["method=lora", f"data.instance_dir={s}", "data.resolution=100"], ValueError, "not a multiple of the VAE factor 8"),
    "class prompt missing with prior preservation": (
        lambda s, t: ["method=dreambooth", f"data.instance_dir={s}", "loss.prior_preservation=true"], ValueError, "data.class_prompt"),
    "unknown method key": (lambda s, t: ["method=lora", f"data.instance_dir={s}", "+method.rnk=4"], ConfigError, "method.rnk|rnk"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_training(case, subject_dir, tmp_path):
    build, error, message = BAD_INPUTS[case]
    args = build(subject_dir, tmp_path)
    if not any(a.startswith("data.instance_prompt") for a in args):
        args.append("data.instance_prompt='a photo of sks cat'")
    with pytest.raises(error, match=message):
        run(compose("personalize", [*args, f"output_dir={tmp_path / 'out'}", "logger=none"]))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_caption_files_and_templates_feed_the_prompts(subject_dir, tmp_path):
    from dreamsteer.data.subject import SubjectDataError, resolve_templates, validate_subject_data

    directory = tmp_path / "captioned"
    paths = write_subject_set(directory, "cat", count=2)
    paths[0].with_suffix(".txt").write_text("a close photo of <sks> cat on grass\n")
    cfg = compose("personalize", overrides("textual_inversion", directory, tmp_path)).data
    concepts = validate_subject_data(cfg, ["<sks>"])
    dataset = SubjectDataset(concepts, 64, shuffle=False, flip_p=0.0)
    assert dataset[0]["prompt"] == "a close photo of <sks> cat on grass" and dataset[1]["prompt"] == cfg.instance_prompt
    assert dataset[0]["pixel_values"].shape == (3, 64, 64)
    # the same example index always gives the same crop, flip and prompt
    assert torch.equal(SubjectDataset(concepts, 64, center_crop=False)[5]["pixel_values"], SubjectDataset(concepts, 64, center_crop=False)[5]["pixel_values"])

    paths[1].with_suffix(".txt").write_text("a cat without the token")
    with pytest.raises(SubjectDataError, match=r"caption file .*cat_01.txt"):
        validate_subject_data(cfg, ["<sks>"])
    cfg.prompt_templates, cfg.subject = "object", "<sks> cat"
    assert len(resolve_templates(cfg)) > 10


def test_text_encoder_lora_under_refusing_transformers_fails_at_validation(transformers_refusing_peft, subject_dir, tmp_path, monkeypatch):
    import dreamsteer.diffusion.backbone

    def load_backbone(*args, **kwargs):
        raise AssertionError("the model was loaded before the version guard")

    monkeypatch.setattr(dreamsteer.diffusion.backbone, "load_backbone", load_backbone)
    with pytest.raises(ConfigError) as failure:
        run(compose("personalize", overrides("lora", subject_dir, tmp_path / "out", "method.train_text_encoder=true")))
    message = str(failure.value)
    assert "\n" not in message and message.startswith("config key 'method.train_text_encoder'")
    assert "transformers 5.24.0" in message and "peft 0.21.2" in message and "peft >= 0.22.0" in message
    assert "pip install -c requirements/lock.txt" in message
    assert not (tmp_path / "out").exists()
    # the UNet-only LoRA is unaffected: validation passes under the same versions
    validate_config(compose("personalize", overrides("lora", subject_dir, tmp_path / "out")))


def test_a_models_recipe_is_an_experiment_config_and_plain_overrides_still_win(subject_dir, tmp_path):
    from dreamsteer.train.config import CONF_DIR, recipe_overrides

    assert recipe_overrides("tiny", "lora") == ["model.pretrained=tiny", "method=lora"]  # no recipe: the method's defaults
    # a re-trained toy model's folder takes toy's recipes on itself; recipes of a model that has none, the defaults
    folder = str(tmp_path / "toy_retrained")
    assert recipe_overrides(folder, "lora") == [f"model.pretrained={folder}", "method=lora"]
    assert recipe_overrides(folder, "lora", recipes_of="toy") == ["experiment=toy_lora", f"model.pretrained={folder}"]
    assert recipe_overrides("toy", "lora", recipes_of="toy") == ["experiment=toy_lora"]
    assert recipe_overrides(folder, "textual_inversion", recipes_of="tiny") == [f"model.pretrained={folder}", "method=textual_inversion"]
    cfg = compose("personalize", overrides("lora", subject_dir, tmp_path, *recipe_overrides(folder, "lora", recipes_of="toy")))
    assert cfg.model.pretrained == folder and cfg.method.lr == OmegaConf.load(CONF_DIR / "experiment" / "toy_lora.yaml").method.lr
    for method in ("lora", "dreambooth", "textual_inversion", "custom_diffusion"):
        assert recipe_overrides("toy", method) == [f"experiment=toy_{method}"]
        recipe = OmegaConf.load(CONF_DIR / "experiment" / f"toy_{method}.yaml")
        cfg = compose("personalize", overrides(method, subject_dir, tmp_path, *recipe_overrides("toy", method)))
        assert (cfg.model.pretrained, cfg.method.name) == ("toy", method)
        default = compose("personalize", overrides(method, subject_dir, tmp_path))
        assert cfg.trainer.max_steps == recipe.trainer.max_steps != default.trainer.max_steps
        for key, value in recipe.method.items():  # each key the recipe sets reaches the method, and is not the SD default
            assert cfg.method[key] == value != default.method[key], (method, key)
        assert cfg.loss.vae_latent == "mean"  # the toy model was pretrained on posterior means
    # DreamBooth's pivot stage learns the word with Textual Inversion's toy recipe
    ti = OmegaConf.load(CONF_DIR / "experiment" / "toy_textual_inversion.yaml")
    cfg = compose("personalize", overrides("dreambooth", subject_dir, tmp_path, "experiment=toy_dreambooth"))
    assert cfg.pivot.max_steps == ti.trainer.max_steps and cfg.pivot.adapter is None
    assert {k: cfg.pivot.method[k] for k in ti.method} == dict(ti.method) and list(cfg.pivot.method.tokens) == ["<sks>"]
    cfg = compose("personalize", overrides("lora", subject_dir, tmp_path, "experiment=toy_lora", "trainer.max_steps=3", "model=tiny"))
    assert cfg.trainer.max_steps == 3 and cfg.model.pretrained == "tiny" and list(cfg.method.target_modules)[0] == "attn2.to_k"
