"""Personalization on the tiny SDXL model: each method trains, exports, and reloads through diffusers' SDXL
loaders (and ours) with the same UNet prediction, added conditions included; the kohya file follows the
ComfyUI / A1111 SDXL key rules, re-implemented here from their published sources (not our code):

- ComfyUI ``comfy/lora.py``: ``lora_unet_<key of the original SGM UNet without .weight, '.' -> '_'>``;
  ``lora_te1_text_model_encoder_layers_<b>_<...>`` patches ``clip_l``, ``lora_te2_...`` ``clip_g`` (both in
  Hugging Face CLIP names: ``self_attn_{q,k,v,out}_proj``, ``mlp_fc1``, ``mlp_fc2``);
- A1111 ``extensions-builtin/Lora/networks.py``: SDXL UNet keys "already have correct compvis keys"
  (``lora_unet`` -> ``diffusion_model``), ``lora_te1_text_model`` -> ``0_transformer_text_model`` (the CLIP-L
  embedder's modules), ``lora_te2_text_model_encoder_layers_<b>_...`` -> ``1_model_transformer_resblocks_<b>_...``
  (OpenCLIP names; ``q/k/v_proj`` fall back to the ``attn`` module holding ``in_proj``).

The original-layout names these rules look up come from our single file, whose layout diffusers' own
``from_single_file`` reads back weight for weight (tested here).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dreamsteer.checkpoints import export_adapter, load_adapter
from dreamsteer.checkpoints.formats import CD_FILE, LORA_FILE, LORA_KOHYA_FILE, SINGLE_FILE, TI_FILE, custom_diffusion_processors
from dreamsteer.data.samples import write_subject_set
from dreamsteer.data.subject import Concept, SubjectDataset, read_instance_items
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.lit_modules.personalize import MODULES
from dreamsteer.train.config import compose
from dreamsteer.train.personalize import validate_config

PROMPTS = {"dreambooth": "a photo of sks cat", "lora": "a photo of sks cat", "textual_inversion": "a photo of <sks> cat",
           "custom_diffusion": "a photo of <new1> cat"}
LR = {"dreambooth": 3e-4, "lora": 3e-3, "textual_inversion": 5e-2, "custom_diffusion": 1e-3}
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj"}


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("subject")
    write_subject_set(directory, "cat", count=2)
    return directory


def train(method: str, backbone, subject_dir: Path, out: Path, *extra: str, steps: int = 2):
    """A personalize module on `backbone` after `steps` AdamW steps on one fixed batch; returns (module, batch)."""
    cfg = validate_config(compose("personalize", [
        f"method={method}", "model=tiny_sdxl", f"data.instance_dir={subject_dir}", f"data.instance_prompt='{PROMPTS[method]}'",
        f"output_dir={out}", "logger=none", *extra,
    ]))
    module = MODULES[method](OmegaConf.to_container(cfg), backbone)
    dataset = SubjectDataset([Concept(read_instance_items(subject_dir), cfg.data.instance_prompt)], 128, seed=0, center_crop=False)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    optimizer = torch.optim.AdamW(backbone.adapter.trainable_parameters(backbone), lr=LR[method])
    module.train()
    losses = []
    for _ in range(steps):
        module.seed_micro_batch(batch)
        loss, _ = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    module.eval()
    return module, batch


PROBE_TIME_IDS = torch.tensor([[160.0, 96.0, 8.0, 4.0, 128.0, 128.0]])


def probe_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])


@torch.no_grad()
def our_prediction(backbone, prompt: str) -> torch.Tensor:
    z, t = probe_inputs()
    return backbone.predict_eps(z, t, backbone.encode_prompt([prompt]), time_ids=PROBE_TIME_IDS)


@torch.no_grad()
def diffusers_prediction(pipe, prompt: str) -> torch.Tensor:
    """The UNet prediction as diffusers' SDXL pipeline computes it: its own prompt encoding, pooled embedding and time_ids."""
    z, t = probe_inputs()
    hidden, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return pipe.unet(z, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": PROBE_TIME_IDS}).sample


def base_pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))


def assert_close(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> None:
    """`a` equals `b`, and the adapter changed the prediction far more than that difference (it takes part)."""
    diff, effect = (a - b).abs().max().item(), (a - base).abs().max().item()
    assert diff < 1e-4 and effect > 100 * diff and effect > 1e-4, (diff, effect)


# ----------------------------------------------------------------------------- key rules (independent)
def original_names(single_file: Path) -> set[str]:
    return set(load_file(str(single_file)))


def comfyui_keys(original: set[str]) -> set[str]:
    keys = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            for k in original if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    for te, prefix in (("lora_te1_", "conditioner.embedders.0.transformer.text_model."), ("lora_te2_", None)):
        for b in range(32):
            for c, name in COMFY_CLIP_MAP.items():
                # ComfyUI converts clip_g from the OpenCLIP checkpoint to Hugging Face names on load; count the layer present
                if prefix is not None and f"{prefix}encoder.layers.{b}.{c}.weight" in original:
                    keys.add(f"{te}text_model_encoder_layers_{b}_{name}")
                if prefix is None and f"conditioner.embedders.1.model.transformer.resblocks.{b}.ln_1.weight" in original:
                    keys.add(f"{te}text_model_encoder_layers_{b}_{name}")
    return keys


def a1111_module(kohya_name: str, original: set[str]) -> str | None:
    """The original-layout module (dotted, without .weight) A1111 patches for a kohya SDXL module, or None."""
    modules = {k.rsplit(".", 1)[0] for k in original}
    a1111 = {}  # A1111's network_layer_mapping: module names with '_' for '.'
    for m in modules:
        if m.startswith("model.diffusion_model."):
            a1111["diffusion_model_" + m[len("model.diffusion_model."):].replace(".", "_")] = m
        for i in (0, 1):
            head = f"conditioner.embedders.{i}."
            if m.startswith(head):
                a1111[f"{i}_" + m[len(head):].replace(".", "_")] = m
    if kohya_name.startswith("lora_unet_"):
        return a1111.get(kohya_name.replace("lora_unet", "diffusion_model"))
    if kohya_name.startswith("lora_te1_text_model"):
        return a1111.get(kohya_name.replace("lora_te1_text_model", "0_transformer_text_model"))
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", kohya_name)
    if m:
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key = f"1_model_transformer_resblocks_{m[1]}_{rest}"
        x_proj = re.match(r"(.*)_([qkv]_proj)$", key)  # A1111's re_x_proj: q/k/v live in the attention's in_proj
        return a1111.get(x_proj[1]) if x_proj else a1111.get(key)
    return None


# ----------------------------------------------------------------------------- tests
def test_lora_on_unet_and_both_text_encoders_reloads_in_diffusers_kohya_and_ours(subject_dir, fresh_sdxl_backbone, tiny_sdxl_dir, tmp_path):
    module, _ = train("lora", fresh_sdxl_backbone, subject_dir, tmp_path, "method.train_text_encoder=true", "method.rank=2")
    backbone = module.backbone
    trained = {n.split(".")[0] for n, p in backbone.adapter.named_trainable(backbone) if "lora_B" in n and p.abs().max() > 0}
    assert trained == {"unet", "text_encoder", "text_encoder_2"}  # every part learned something
    prompt = PROMPTS["lora"]
    ours = our_prediction(backbone, prompt)
    out = export_adapter(backbone, tmp_path / "adapter")

    pipe = base_pipe(tiny_sdxl_dir)
    base = diffusers_prediction(pipe, prompt)
    assert torch.allclose(base, our_prediction(load_backbone(str(tiny_sdxl_dir)), prompt), atol=1e-5)  # same probe, no adapter
    diffusers_keys = load_file(str(out / LORA_FILE))
    assert {k.split(".")[0] for k in diffusers_keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE)
    assert_close(diffusers_prediction(pipe, prompt), ours, base)

    kohya_pipe = base_pipe(tiny_sdxl_dir)
    kohya_pipe.load_lora_weights(str(out), weight_name=LORA_KOHYA_FILE)  # diffusers' converter of kohya SDXL names
    assert_close(diffusers_prediction(kohya_pipe, prompt), ours, base)

    reloaded = load_backbone(str(tiny_sdxl_dir))
    load_adapter(reloaded, out)
    assert_close(our_prediction(reloaded, prompt), ours, base)

    # the key rules, against the original layout (ours, read back by diffusers in the DreamBooth test)
    from dreamsteer.checkpoints.sd_single_file import pipeline_to_original

    base_bb = load_backbone(str(tiny_sdxl_dir))
    original = set(pipeline_to_original(base_bb.unet, base_bb.vae, base_bb.text_encoder, False, base_bb.text_encoder_2))
    kohya_file = load_file(str(out / LORA_KOHYA_FILE))
    names = {k.split(".")[0] for k in kohya_file}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert names <= comfyui_keys(original), sorted(names - comfyui_keys(original))[:5]
    unmapped = sorted(n for n in names if a1111_module(n, original) is None)
    assert not unmapped, unmapped[:5]
    assert any(n.startswith("lora_unet_input_blocks_") for n in names) and not any("down_blocks" in n for n in names)
    from safetensors import safe_open

    with safe_open(str(out / LORA_KOHYA_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False" and meta["ss_network_dim"] == "2"


def test_textual_inversion_trains_a_vector_per_encoder_and_loads_as_an_sdxl_embedding(subject_dir, fresh_sdxl_backbone, tiny_sdxl_dir, tmp_path):
    module, _ = train("textual_inversion", fresh_sdxl_backbone, subject_dir, tmp_path, "method.num_vectors=2")
    backbone = module.backbone
    named = dict(backbone.adapter.named_trainable(backbone))
    assert sorted(n.split(".")[0] for n in named) == ["text_encoder", "text_encoder_2"]
    prompt = PROMPTS["textual_inversion"]
    ours = our_prediction(backbone, prompt)
    out = export_adapter(backbone, tmp_path / "adapter")

    embedding = load_file(str(out / TI_FILE))
    assert set(embedding) == {"clip_l", "clip_g"}
    assert embedding["clip_l"].shape == (2, 32) and embedding["clip_g"].shape == (2, 64)
    assert torch.equal(load_file(str(out / "a1111" / "sks.safetensors"))["clip_g"], embedding["clip_g"])
    for name, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):  # the trained rows, each encoder's own
        assert torch.equal(embedding[key], backbone.adapter.vectors(backbone, name)["<sks>"])
        assert not torch.equal(embedding[key][0], embedding[key][1])

    pipe = base_pipe(tiny_sdxl_dir)
    base = diffusers_prediction(pipe, "a photo of cat cat")  # any prompt without the token: the base model
    # diffusers' documented SDXL recipe: one load_textual_inversion per text encoder
    pipe.load_textual_inversion(embedding["clip_l"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(embedding["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    assert_close(diffusers_prediction(pipe, prompt), ours, base)

    reloaded = load_backbone(str(tiny_sdxl_dir))
    load_adapter(reloaded, out)
    assert_close(our_prediction(reloaded, prompt), ours, base)


def test_dreambooth_exports_an_sdxl_pipeline_folder_and_single_file(subject_dir, fresh_sdxl_backbone, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    module, _ = train("dreambooth", fresh_sdxl_backbone, subject_dir, tmp_path, "method.train_text_encoder=true", steps=1)
    backbone = module.backbone
    prompt = PROMPTS["dreambooth"]
    ours = our_prediction(backbone, prompt)
    out = export_adapter(backbone, tmp_path / "adapter")
    base = diffusers_prediction(base_pipe(tiny_sdxl_dir), prompt)

    folder = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert_close(diffusers_prediction(folder, prompt), ours, base)
    single = StableDiffusionXLPipeline.from_single_file(str(out / SINGLE_FILE), config=str(out), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # diffusers' LDM/SGM converters give back every weight
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert "model.diffusion_model.label_emb.0.0.weight" in original_names(out / SINGLE_FILE)

    reloaded = load_backbone(str(tiny_sdxl_dir))
    load_adapter(reloaded, out)
    assert_close(our_prediction(reloaded, prompt), ours, base)
    with reloaded.adapter_disabled():  # the base text encoders and UNet come back
        assert torch.allclose(our_prediction(reloaded, prompt), base, atol=1e-5)


def test_loss_conditions_the_unet_on_each_views_original_size_and_crop(subject_dir, fresh_sdxl_backbone, tmp_path):
    module, batch = train("lora", fresh_sdxl_backbone, subject_dir, tmp_path, steps=0)
    b = module.backbone
    with torch.no_grad():
        for name, p in b.adapter.named_trainable(b):
            p.add_(0.02)
        module.seed_micro_batch(batch)
        loss, _ = module.compute_loss(batch)

        module.seed_micro_batch(batch)  # the same draws by hand, the UNet called with diffusers' added conditions
        z = b.vae.encode(batch["pixel_values"]).latent_dist.sample() * b.vae.config.scaling_factor
        eps = torch.randn(z.shape)
        t = torch.randint(0, 1000, (z.shape[0],))
        a = b.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        hidden, pooled = [], None
        for encoder, tokenizer in ((b.text_encoder, b.tokenizer), (b.text_encoder_2, b.tokenizer_2)):
            ids = tokenizer(list(batch["prompt"]), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        time_ids = torch.tensor([[*size, *crop, 128, 128] for size, crop in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist())],
                                dtype=torch.float32)
        pred = b.unet(z_t, t, encoder_hidden_states=torch.cat(hidden, -1), added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        expected = (pred - eps).square().mean()
        assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())
        moved = dict(batch, original_size=batch["original_size"] * 8, crop_top_left=batch["crop_top_left"] + 300)
        module.seed_micro_batch(moved)
        assert (module.compute_loss(moved)[0] - loss).abs() > 1e-4 * loss  # size and crop are inputs, not ignored


def test_views_report_original_size_and_crop_as_sdxl_trains_on_them(tmp_path):
    from PIL import Image

    Image.new("RGB", (96, 64), (200, 10, 10)).save(tmp_path / "wide.png")
    concepts = [Concept(read_instance_items(tmp_path), "a photo")]
    centered = SubjectDataset(concepts, 32, seed=0, flip_p=0.0)[0]
    # resized to cover 32 x 32: 48 x 32, the centre crop starts 8 px from the left
    assert centered["original_size"].tolist() == [64, 96] and centered["crop_top_left"].tolist() == [0, 8]
    seen = set()
    for i in range(12):
        view = SubjectDataset(concepts, 32, seed=0, center_crop=False, flip_p=0.5)[i]
        left, flip = int(view["latent_key"].split("|")[2].split(",")[0]), view["latent_key"].endswith("|1")
        assert view["crop_top_left"].tolist() == [0, 48 - left - 32 if flip else left]
        seen.add((left, flip))
    assert len({flip for _, flip in seen}) == 2 and len({left for left, _ in seen}) > 1


def test_custom_diffusion_trains_kv_and_a_token_per_encoder_and_loads_in_diffusers(subject_dir, fresh_sdxl_backbone, tiny_sdxl_dir, tmp_path):
    module, _ = train("custom_diffusion", fresh_sdxl_backbone, subject_dir, tmp_path)
    backbone = module.backbone
    named = dict(backbone.adapter.named_trainable(backbone))
    assert {n.split(".")[0] for n in named} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in named if n.startswith("unet."))
    prompt = PROMPTS["custom_diffusion"]
    ours = our_prediction(backbone, prompt)
    out = export_adapter(backbone, tmp_path / "adapter")
    embedding = load_file(str(out / TI_FILE))
    assert embedding["clip_l"].shape == (1, 32) and embedding["clip_g"].shape == (1, 64)

    pipe = base_pipe(tiny_sdxl_dir)
    base = diffusers_prediction(pipe, "a photo of cat cat")
    pipe.unet.set_attn_processor(custom_diffusion_processors(pipe.unet, out / CD_FILE))  # diffusers' own processors
    pipe.load_textual_inversion(embedding["clip_l"], token="<new1>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(embedding["clip_g"], token="<new1>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    assert_close(diffusers_prediction(pipe, prompt), ours, base)

    reloaded = load_backbone(str(tiny_sdxl_dir))
    load_adapter(reloaded, out)
    assert_close(our_prediction(reloaded, prompt), ours, base)


def test_personalize_task_on_sdxl_with_prior_preservation_and_validation_images(subject_dir, tiny_sdxl_dir, tmp_path):
    from dreamsteer.train.personalize import run

    common = [f"data.instance_dir={subject_dir}", f"model.pretrained={tiny_sdxl_dir}", "logger=none", "progress=false", "trainer.max_steps=2"]
    out = run(compose("personalize", [
        "method=lora", "data.instance_prompt='a photo of sks cat'", f"output_dir={tmp_path / 'run'}", *common,
        "loss.prior_preservation=true", "data.class_prompt='a photo of a cat'", "data.num_class_images=1", "data.class_steps=2",
        "validation.every_n_steps=2", "validation.num_images=1", "validation.steps=2",
    ]))
    assert (out / LORA_KOHYA_FILE).is_file() and (tmp_path / "run" / "class_images" / "class_00000.png").is_file()
    assert (tmp_path / "run" / "samples" / "step000002" / "prompt0_0.png").is_file()  # sampled by the SDXL pipeline
    from dreamsteer.train.export import run as export_run

    again = export_run(compose("export", [f"ckpt={tmp_path / 'run'}", f"dir={tmp_path / 'again'}"]))  # from last.ckpt
    assert (again / LORA_FILE).read_bytes() == (out / LORA_FILE).read_bytes()  # the export at the end of training, byte for byte
    kohya_again, kohya_end = load_file(str(again / LORA_KOHYA_FILE)), load_file(str(out / LORA_KOHYA_FILE))  # (its metadata names the folder)
    assert kohya_again.keys() == kohya_end.keys() and all(torch.equal(kohya_again[k], kohya_end[k]) for k in kohya_end)


def test_merge_and_convert_refuse_an_sdxl_model(tiny_sdxl_dir, tmp_path):
    from dreamsteer.train import convert, merge
    from dreamsteer.train.config import ConfigError

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")  # never read: the model is refused first
    with pytest.raises(ConfigError, match="SDXL model; convert reads SD 1.x/2.x"):
        convert.run(compose("convert", [f"model.pretrained={tiny_sdxl_dir}", f"lora={lora}", f"out={tmp_path / 'k.safetensors'}"]))
    with pytest.raises(ConfigError, match="sdxl model; merge reads SD 1.x/2.x"):
        merge.run(compose("merge", [f"model.pretrained={tiny_sdxl_dir}", f"loras=[{lora}]", f"out={tmp_path / 'm'}", f"output_dir={tmp_path / 'o'}"]))
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "m").exists()
