"""The SDXL family on the tiny SDXL model: its shape, prompt encoding and added conditions against diffusers'
own SDXL pipeline, loading, and `sample`."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dreamsteer.diffusion.backbone import ModelLoadError, load_backbone
from dreamsteer.diffusion.tiny import build_tiny_sdxl_pipeline


def reference_pipeline(bb):
    """diffusers' SDXL pipeline over the backbone's modules: the independent reference for encoding and time ids."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2,
                                     tokenizer=bb.tokenizer, tokenizer_2=bb.tokenizer_2, unet=bb.unet, scheduler=bb.sampling_scheduler,
                                     add_watermarker=False)


def test_tiny_sdxl_has_sdxl_shape(tiny_sdxl_backbone):
    bb = tiny_sdxl_backbone
    config = bb.unet.config
    assert bb.family.name == "sdxl" and bb.family.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert config.addition_embed_type == "text_time" and max(config.transformer_layers_per_block) > 1
    assert config.down_block_types[0] == "DownBlock2D" and config.layers_per_block == 2
    assert type(bb.text_encoder).__name__ == "CLIPTextModel" and type(bb.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert config.cross_attention_dim == bb.text_encoder.config.hidden_size + bb.text_encoder_2.config.hidden_size
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + bb.text_encoder_2.config.projection_dim
    assert bb.vae.config.scaling_factor == 0.13025 and bb.resolution == 128
    assert len(bb.text_encoders()) == 2 and len(bb.modules()) == 4
    assert not any(p.requires_grad for m in bb.modules() for p in m.parameters())


def test_tiny_sdxl_round_trip_and_seeds(tiny_sdxl_backbone):
    built = build_tiny_sdxl_pipeline(seed=0)
    for module, loaded in ((built.unet, tiny_sdxl_backbone.unet), (built.text_encoder_2, tiny_sdxl_backbone.text_encoder_2)):
        state = loaded.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    other = build_tiny_sdxl_pipeline(seed=1).unet.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in built.unet.state_dict().items())


def test_encode_prompt_equals_the_sdxl_pipelines_encoding(tiny_sdxl_backbone):
    bb = tiny_sdxl_backbone
    prompt = "a photo of a cat wearing a hat"
    with torch.no_grad():
        hidden, null_hidden, pooled, null_pooled = reference_pipeline(bb).encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
        emb = bb.encode_prompt([prompt, ""])
    assert emb.shape == (2, 78, 96)
    ours_hidden, ours_pooled = bb.family.split(emb)
    torch.testing.assert_close(ours_hidden[:1], hidden)
    torch.testing.assert_close(ours_pooled[:1], pooled)
    # force_zeros_for_empty_prompt: SDXL's unconditional input is all zeros, as the pipeline's negative
    torch.testing.assert_close(ours_hidden[1:], null_hidden)
    torch.testing.assert_close(ours_pooled[1:], null_pooled)
    assert float(null_hidden.abs().sum()) == 0
    assert torch.equal(emb[0, -1, 64:], torch.zeros(32))  # the pooled row is zero-padded past its 64 features


def test_predict_eps_adds_the_pooled_embedding_and_time_ids(tiny_sdxl_backbone):
    bb = tiny_sdxl_backbone
    pipe = reference_pipeline(bb)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(["a photo of a cat", "a dog"], device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((128, 128), (0, 0), (128, 128), torch.float32, bb.text_encoder_2.config.projection_dim)
        expected = bb.unet(z, t, encoder_hidden_states=hidden,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)}).sample
        emb = bb.encode_prompt(["a photo of a cat", "a dog"])
        torch.testing.assert_close(bb.predict_eps(z, t, emb), expected)
        cropped = torch.tensor([256.0, 256.0, 32.0, 0.0, 128.0, 128.0])
        expected_cropped = bb.unet(z, t, encoder_hidden_states=hidden,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": cropped.repeat(2, 1)}).sample
        torch.testing.assert_close(bb.predict_eps(z, t, emb, time_ids=bb.family.time_ids((256, 256), (32, 0), (128, 128))), expected_cropped)
        assert not torch.allclose(expected, expected_cropped)  # the time ids reach the UNet


def test_sd_family_is_unchanged(tiny_backbone):
    assert tiny_backbone.family.name == "sd" and tiny_backbone.text_encoder_2 is None
    with torch.no_grad():
        emb = tiny_backbone.encode_prompt(["a photo of a cat"])
        torch.testing.assert_close(emb, tiny_backbone.text_encoder(tiny_backbone.tokenize(["a photo of a cat"]))[0])
    with pytest.raises(ValueError, match="time_ids are an SDXL added condition"):
        tiny_backbone.predict_eps(torch.zeros(1, 4, 16, 16), torch.tensor(10), emb, time_ids=torch.zeros(6))
    with pytest.raises(TypeError, match="two tokenizers"):
        load_backbone("tiny-sdxl").encode_prompt(torch.zeros(1, 77, dtype=torch.long))


def test_load_sdxl_by_name_and_folder_and_the_folders_checks(tiny_sdxl_dir, tmp_path):
    by_name = load_backbone("tiny-sdxl")
    assert by_name.family.name == "sdxl" and type(by_name.sampling_scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(by_name.pipeline()).__name__ == "StableDiffusionXLPipeline"
    broken = tmp_path / "no_te2"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="missing text_encoder_2/"):
        load_backbone(str(broken))
    # a folder saved with force_zeros_for_empty_prompt=false encodes "" as text, like its pipeline
    plain = tmp_path / "no_zeros"
    shutil.copytree(tiny_sdxl_dir, plain)
    index = json.loads((plain / "model_index.json").read_text())
    (plain / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    with torch.no_grad():
        assert float(load_backbone(str(plain)).encode_prompt([""]).abs().sum()) > 0


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_loads_as_its_family_with_a_local_config(family, tiny_dir, tiny_sdxl_dir, tmp_path):
    """An A1111-layout .safetensors (written by checkpoints.sd_single_file) loads with the configs of a local folder
    and predicts what the folder predicts; SDXL is recognised by its second text encoder."""
    from dreamsteer.checkpoints.safetensors_files import save_safetensors
    from dreamsteer.checkpoints.sd_single_file import pipeline_to_original

    folder = {"sd": tiny_dir, "sdxl": tiny_sdxl_dir}[family]
    bb = load_backbone(str(folder))
    path = save_safetensors(pipeline_to_original(bb.unet, bb.vae, bb.text_encoder, False, text_encoder_2=bb.text_encoder_2),
                            tmp_path / "model.safetensors")
    single = load_backbone(str(path), single_file_config=str(folder))
    assert single.family.name == family
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    with torch.no_grad():
        expected = bb.predict_eps(z, t, bb.encode_prompt(["a photo of a cat"]))
        torch.testing.assert_close(single.predict_eps(z, t, single.encode_prompt(["a photo of a cat"])), expected, rtol=0, atol=1e-5)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
        load_backbone(str(tmp_path / "broken.safetensors"), single_file_config=str(folder))


def test_fp16_with_the_stock_sdxl_vae_warns_and_bf16_does_not(tiny_sdxl_dir):
    import warnings

    with pytest.warns(UserWarning, match="overflows in fp16.*bf16.*sdxl-vae-fp16-fix"):
        load_backbone(str(tiny_sdxl_dir), dtype="fp16")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*overflows in fp16.*")
        assert load_backbone(str(tiny_sdxl_dir), dtype="bf16").vae.dtype == torch.bfloat16


def test_hub_id_takes_the_pipeline_class_from_the_hubs_model_index(tiny_sdxl_dir, monkeypatch):
    """No network: the hub's model_index.json and the download are replaced by the local folder."""
    import diffusers

    seen = {}
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", classmethod(lambda cls, name, **kw: json.loads((tiny_sdxl_dir / "model_index.json").read_text())))
    real = diffusers.StableDiffusionXLPipeline.from_pretrained.__func__

    def from_pretrained(cls, name, **kwargs):
        seen["name"], seen["cls"] = name, cls.__name__
        return real(cls, str(tiny_sdxl_dir), **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", classmethod(from_pretrained))
    bb = load_backbone("someone/some-sdxl")
    assert seen == {"name": "someone/some-sdxl", "cls": "StableDiffusionXLPipeline"} and bb.family.name == "sdxl"


def test_sample_task_on_tiny_sdxl_matches_the_pipeline(tiny_sdxl_dir, tmp_path):
    from PIL import Image

    from dreamsteer.diffusion.schedulers import make_scheduler
    from dreamsteer.train.config import compose
    from dreamsteer.train.sample import run

    cfg = compose("sample", ["model=tiny_sdxl", "steps=2", "num_images=1", "logger=none", "prompt=a photo of a cat",
                             f"output_dir={tmp_path}"])
    image = Image.open(run(cfg)[0])
    assert image.size == (128, 128)
    bb = load_backbone(str(tiny_sdxl_dir))
    pipe = reference_pipeline(bb)
    pipe.scheduler = make_scheduler("ddim", bb.scheduler.config)
    expected = pipe(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.tobytes() == expected.tobytes()

    # with an SDXL LoRA export: the adapter reaches the UNet the pipeline samples with
    from dreamsteer.checkpoints import export_adapter
    from dreamsteer.diffusion.adapters import attach_adapter

    attach_adapter(bb, "lora", rank=4)
    with torch.no_grad():
        for p in bb.adapter.trainable_parameters(bb):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    lora = export_adapter(bb, tmp_path / "lora", {"instance_prompt": "a photo of sks cat"})
    adapted = run(compose("sample", ["model=tiny_sdxl", "steps=2", "num_images=1", "logger=none", "prompt=a photo of a cat",
                                     f"adapter={lora}", f"output_dir={tmp_path / 'adapted'}"]))
    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_pretrained(str(bb.source), add_watermarker=False)
    theirs.load_lora_weights(str(lora))
    theirs.scheduler = make_scheduler("ddim", bb.scheduler.config)
    expected = theirs(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(0)).images[0]
    assert Image.open(adapted[0]).tobytes() == expected.tobytes() != image.tobytes()
