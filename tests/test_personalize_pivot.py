"""Pivotal tuning: LoRA / DreamBooth trained on frozen Textual Inversion words, exported with them and loaded back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamsteer.checkpoints import export_adapter, load_adapter
from dreamsteer.checkpoints.adapter_io import AdapterLoadError, load_pivot
from dreamsteer.checkpoints.formats import SINGLE_FILE
from dreamsteer.data.samples import write_subject_set
from dreamsteer.diffusion.adapters import AdapterError, attach_adapter, bake_textual_inversion, model_fingerprint
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run

PROMPT = "a photo of <sks> cat"


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("subject")
    write_subject_set(directory, "cat", count=3)
    return directory


def _textual_inversion(backbone, num_vectors: int = 2, seed: int = 0):
    """A TI adapter whose rows are random (distinct per row), as after training."""
    adapter = attach_adapter(backbone, "textual_inversion", tokens=["<sks>"], initializer_token="cat", num_vectors=num_vectors)
    with torch.no_grad():
        rows = adapter.named_trainable(backbone)[0][1]
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed)))
    return adapter


def _eps(backbone, prompt: str = PROMPT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return backbone.predict_eps(z, torch.tensor([500]), backbone.encode_prompt([prompt]))


@pytest.fixture(scope="module")
def ti_export(tmp_path_factory, tiny_dir) -> Path:
    backbone = load_backbone(str(tiny_dir))
    _textual_inversion(backbone)
    return export_adapter(backbone, tmp_path_factory.mktemp("ti") / "adapter")


def test_baked_words_encode_as_the_textual_inversion_did_and_leave_the_vocabulary_alone(tiny_dir, tiny_backbone):
    backbone = load_backbone(str(tiny_dir))
    base_fingerprint = model_fingerprint(backbone)
    adapter = _textual_inversion(backbone)
    rows = adapter.vectors(backbone)["<sks>"]
    with_adapter = backbone.encode_prompt([PROMPT, "a photo of a cat"])
    words = bake_textual_inversion(backbone)
    assert backbone.adapter is None and words.tokens == ["<sks>"] and words.num_vectors == 2
    table = backbone.text_encoder.get_input_embeddings()
    assert type(table) is torch.nn.Embedding and not table.weight.requires_grad
    base_rows = tiny_backbone.text_encoder.get_input_embeddings().weight
    assert table.weight.shape[0] == base_rows.shape[0] + 2 and torch.equal(table.weight[: base_rows.shape[0]], base_rows)
    assert torch.equal(table.weight[base_rows.shape[0]:], rows)  # tok, tok_1 in order
    assert torch.equal(backbone.encode_prompt([PROMPT, "a photo of a cat"]), with_adapter)
    assert torch.equal(backbone.encode_prompt(["a photo of a cat"]), tiny_backbone.encode_prompt(["a photo of a cat"]))
    # the base model is still the one without the words; a second word-adding method is refused
    assert model_fingerprint(backbone) == base_fingerprint
    with pytest.raises(AdapterError, match="pivot words"):
        attach_adapter(backbone, "custom_diffusion", modifier_tokens=["<new1>"])
    lora = attach_adapter(backbone, "lora", rank=2)
    assert lora.base_fingerprint == base_fingerprint
    assert not any("token_embedding" in name for name, _ in lora.named_trainable(backbone))


@pytest.mark.parametrize("kind", ["lora", "dreambooth"])
def test_an_adapter_trained_on_pivot_words_exports_and_reloads_them(kind, ti_export, tiny_dir, tiny_backbone, tmp_path):
    backbone = load_backbone(str(tiny_dir))
    load_pivot(backbone, ti_export)
    adapter = attach_adapter(backbone, kind, **({"rank": 2} if kind == "lora" else {}))
    with torch.no_grad():
        for _, p in adapter.named_trainable(backbone)[:6]:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    trained = _eps(backbone)
    out = export_adapter(backbone, tmp_path / kind)
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["pivot"] == {"tokens": ["<sks>"], "initializer_token": "cat", "num_vectors": 2,
                                 "token_files": {"<sks>": "pivot/learned_embeds.safetensors"}}
    ti_rows = load_file(str(ti_export / "learned_embeds.safetensors"))["<sks>"]
    assert torch.equal(load_file(str(out / "pivot" / "learned_embeds.safetensors"))["<sks>"], ti_rows)
    assert "pivot/a1111/sks.safetensors" in manifest["use_with"]["a1111"]

    reloaded = load_backbone(str(tiny_dir))
    load_adapter(reloaded, out)
    assert reloaded.words.tokens == ["<sks>"]
    assert torch.equal(_eps(reloaded), trained)
    with reloaded.adapter_disabled():  # the base model, words kept: what the words alone draw
        assert not torch.allclose(_eps(reloaded), trained)
    from diffusers import StableDiffusionPipeline

    if kind == "dreambooth":  # the single file keeps the base vocabulary: A1111 builds CLIP with it, the words come as embeddings
        single = load_file(str(out / SINGLE_FILE))
        key = next(k for k in single if k.endswith("token_embedding.weight"))
        assert single[key].shape[0] == tiny_backbone.text_encoder.get_input_embeddings().weight.shape[0]
        pipe = StableDiffusionPipeline.from_pretrained(str(out))  # the folder's tokenizer and text encoder hold the words
    else:  # diffusers' own loaders: the words (load_textual_inversion) and then the LoRA
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        pipe.load_textual_inversion(str(out / "pivot"))
        pipe.load_lora_weights(str(out))
        card = (out / "README.md").read_text()  # the card's diffusers steps: the words, then the LoRA
        assert -1 < card.index("load_textual_inversion('lora/pivot/learned_embeds.safetensors'") < card.index("load_lora_weights")
    assert "pivot/a1111/sks.safetensors` into the embeddings folder" in (out / "README.md").read_text()
    with torch.no_grad():
        cond = pipe.encode_prompt([PROMPT], "cpu", 1, False)[0]  # diffusers expands "<sks>" into both vectors
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        theirs = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=cond).sample
    assert torch.allclose(theirs, trained, atol=1e-6, rtol=0), (theirs - trained).abs().max()


def test_a_bad_pivot_entry_is_refused_before_the_model_changes(ti_export, tiny_dir, tmp_path):
    backbone = load_backbone(str(tiny_dir))
    load_pivot(backbone, ti_export)
    attach_adapter(backbone, "lora", rank=2)
    out = export_adapter(backbone, tmp_path / "lora")
    with pytest.raises(AdapterLoadError, match="textual_inversion export"):
        load_pivot(load_backbone(str(tiny_dir)), out)  # a LoRA export is no source of words
    manifest = json.loads((out / "adapter.json").read_text())
    manifest["pivot"]["token_files"] = {"<other>": "pivot/learned_embeds.safetensors"}
    (out / "adapter.json").write_text(json.dumps(manifest))
    fresh = load_backbone(str(tiny_dir))
    with pytest.raises(AdapterLoadError, match="pivot.token_files"):
        load_adapter(fresh, out)
    assert fresh.words is None and fresh.adapter is None


def _cfg(subject_dir: Path, out: Path, *extra: str):
    return compose("personalize", [f"data.instance_dir={subject_dir}", f"data.instance_prompt='{PROMPT}'", f"output_dir={out}",
                                   "logger=none", "model=tiny", "trainer.max_steps=2", *extra])


def test_a_pivot_stage_trains_the_words_first_and_the_lora_keeps_them_frozen(subject_dir, tmp_path, tiny_dir):
    from dreamsteer.train import export as export_task

    import lightning as L

    class CountSteps(L.Callback):
        def __init__(self):
            self.modules = []

        def on_train_batch_end(self, trainer, module, *args):
            self.modules.append(module.method)

    out = tmp_path / "run"
    stage = ["pivot.max_steps=2", "pivot.method.num_vectors=2", "pivot.method.initializer_token=cat", "pivot.method.lr=0.05"]
    counter = CountSteps()
    adapter = run(_cfg(subject_dir, out, "method=lora", "method.lr=0.01", *stage), callbacks=[counter])
    assert counter.modules == ["lora", "lora"]  # the caller's callbacks watch the LoRA's fit, not the stage's
    pivot = json.loads((out / "pivot" / "adapter" / "adapter.json").read_text())
    assert pivot["method"] == "textual_inversion" and pivot["training_steps"] == 2
    learned = load_file(str(out / "pivot" / "adapter" / "learned_embeds.safetensors"))["<sks>"]
    start = load_backbone(str(tiny_dir)).text_encoder.get_input_embeddings().weight[
        load_backbone(str(tiny_dir)).tokenizer.convert_tokens_to_ids("cat")]
    assert not torch.allclose(learned, start.expand_as(learned))  # the stage trained the words
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["method"] == "lora" and manifest["pivot"]["num_vectors"] == 2 and manifest["training"]["pivot"]["max_steps"] == 2
    assert torch.equal(load_file(str(adapter / "pivot" / "learned_embeds.safetensors"))["<sks>"], learned)  # frozen through the LoRA
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora" in key for key in state)

    # a resumed run reuses the finished stage; the export task rebuilds the words from it
    stamp = (out / "pivot" / "adapter" / "adapter.json").stat().st_mtime_ns
    run(_cfg(subject_dir, out, "method=lora", "method.lr=0.01", *stage, "ckpt_path=last"))
    assert (out / "pivot" / "adapter" / "adapter.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="pivot.method.lr"):  # the words a checkpoint trained on stay
        run(_cfg(subject_dir, out, "method=lora", "method.lr=0.01", *stage[:3], "pivot.method.lr=0.01", "ckpt_path=last"))
    again = export_task.run(compose("export", [f"ckpt={out}", f"dir={tmp_path / 'again'}"]))
    original, rebuilt = load_backbone(str(tiny_dir)), load_backbone(str(tiny_dir))
    load_adapter(original, adapter)
    load_adapter(rebuilt, again)
    assert torch.equal(_eps(original), _eps(rebuilt))


def test_dreambooth_on_a_given_textual_inversion_export(subject_dir, ti_export, tmp_path, tiny_dir):
    adapter = run(_cfg(subject_dir, tmp_path / "run", "method=dreambooth", f"pivot.adapter={ti_export}"))
    assert not (tmp_path / "run" / "pivot").exists()
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["pivot"]["tokens"] == ["<sks>"] and manifest["training"]["pivot"]["adapter"] == str(ti_export)
    backbone = load_backbone(str(tiny_dir))
    load_adapter(backbone, adapter)
    assert backbone.words.tokens == ["<sks>"]


@pytest.mark.parametrize("extra, match", [
    (["method=textual_inversion", "pivot.max_steps=2"], "pivot words are for method=lora or dreambooth"),
    (["method=lora", "pivot.max_steps=2", "pivot.adapter=/nowhere"], "one source of pivot words"),
    (["method=lora", "pivot.max_steps=-1"], "pivot.max_steps"),
    (["method=lora", "pivot.adapter=/nowhere"], "pivot.adapter"),
    (["method=lora", "pivot.max_steps=2", "pivot.method.tokens=['<other>']"], "<other>"),  # the prompts name <sks>
])
def test_bad_pivot_settings_fail_before_anything_is_written(extra, match, subject_dir, tmp_path):
    with pytest.raises((ConfigError, ValueError), match=match):
        run(_cfg(subject_dir, tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_a_lora_export_is_no_pivot(subject_dir, ti_export, tmp_path, tiny_dir):
    backbone = load_backbone(str(tiny_dir))
    attach_adapter(backbone, "lora", rank=2)
    lora = export_adapter(backbone, tmp_path / "lora")
    with pytest.raises(ConfigError, match="pivot.adapter.*lora export"):
        run(_cfg(subject_dir, tmp_path / "run", "method=lora", f"pivot.adapter={lora}"))


def test_sdxl_pivot_words_live_in_both_text_encoders_and_reload(tiny_sdxl_dir, tmp_path):
    backbone = load_backbone(str(tiny_sdxl_dir))
    _textual_inversion(backbone)
    ti = export_adapter(backbone, tmp_path / "ti")
    backbone = load_backbone(str(tiny_sdxl_dir))
    words = load_pivot(backbone, ti)
    assert [len(t) for _, _, t in backbone.family.text_encoders(backbone)] == [e.get_input_embeddings().weight.shape[0]
                                                                               for e in backbone.text_encoders()]
    lora = attach_adapter(backbone, "lora", rank=2)
    with torch.no_grad():
        for _, p in lora.named_trainable(backbone)[:6]:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cond = backbone.encode_prompt([PROMPT])
    out = export_adapter(backbone, tmp_path / "lora")
    stored = load_file(str(out / "pivot" / "learned_embeds.safetensors"))
    assert torch.equal(stored["clip_g"], words.vectors(backbone, "text_encoder_2")["<sks>"])
    reloaded = load_backbone(str(tiny_sdxl_dir))
    load_adapter(reloaded, out)
    assert torch.equal(reloaded.encode_prompt([PROMPT]), cond)


def test_steer_and_edit_use_the_pivot_words_and_the_steered_export_keeps_them(ti_export, tiny_dir, tmp_path):
    """DreamSteerer over a LoRA trained on pivot words: the reference prompt names the word, the steered export carries
    the same words (steering trains the LoRA alone), and `edit` loads it."""
    from dreamsteer.data.samples import write_sample_images
    from dreamsteer.train.edit import run as edit
    from dreamsteer.train.steer import run as steer

    parent = load_backbone(str(tiny_dir))
    load_pivot(parent, ti_export)
    attach_adapter(parent, "lora", rank=2)
    adapter = export_adapter(parent, tmp_path / "parent", {"instance_prompt": PROMPT})
    write_sample_images(tmp_path / "photos", ["cat"])
    image = tmp_path / "photos" / "cat.png"
    steered = steer(compose("steer", [
        f"adapter={adapter}", f"image={image}", "source_prompt='a photo of a cat next to a mirror'",
        "ref_prompt='a photo of <sks> cat next to a mirror'", f"output_dir={tmp_path / 'steer'}", f"model.pretrained={tiny_dir}",
        "steps=2", "mode_shift.n_ms=1", "mode_shift.sampling_steps=2", "mode_shift.end=0.5", "mask.timesteps=[300]", "progress=false",
        "logger=none",
    ]))
    manifest = json.loads((steered / "adapter.json").read_text())
    assert manifest["pivot"]["tokens"] == ["<sks>"]
    assert torch.equal(load_file(str(steered / "pivot" / "learned_embeds.safetensors"))["<sks>"],
                       load_file(str(ti_export / "learned_embeds.safetensors"))["<sks>"])
    edit(compose("edit", [f"model.pretrained={tiny_dir}", f"adapter={steered}", f"image={image}", "editor=dds", "editor.steps=1",
                          "source_prompt='a photo of a cat'", "target_prompt='a photo of <sks> cat'", f"output_dir={tmp_path / 'edit'}",
                          "progress=false"]))
    assert list((tmp_path / "edit").rglob("*.png"))


def test_merge_bakes_a_pivot_lora_with_its_words(ti_export, tiny_dir, tmp_path):
    """The merged folder holds the words in its tokenizer and text encoder: diffusers' pipeline on it predicts what our
    backbone with the LoRA does; two exports that each carry words are refused."""
    from diffusers import StableDiffusionPipeline

    from dreamsteer.train.merge import run as merge

    backbone = load_backbone(str(tiny_dir))
    load_pivot(backbone, ti_export)
    lora = attach_adapter(backbone, "lora", rank=2)
    with torch.no_grad():
        for _, p in lora.named_trainable(backbone):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    trained = _eps(backbone)
    adapter = export_adapter(backbone, tmp_path / "lora")
    merged = merge(compose("merge", [f"model.pretrained={tiny_dir}", f"loras=[{adapter}]", f"out={tmp_path / 'merged'}"]))
    record = json.loads((merged / "merge.json").read_text())
    assert record["pivot"]["tokens"] == ["<sks>"] and "pivot/a1111/sks.safetensors" in record["files"]
    pipe = StableDiffusionPipeline.from_pretrained(str(merged))
    with torch.no_grad():
        cond = pipe.encode_prompt([PROMPT], "cpu", 1, False)[0]
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        theirs = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=cond).sample
    assert torch.allclose(theirs, trained, atol=2e-5, rtol=0), (theirs - trained).abs().max()
    with pytest.raises(ConfigError, match="each carry pivot words"):
        merge(compose("merge", [f"model.pretrained={tiny_dir}", f"loras=[{adapter},{adapter}]", f"out={tmp_path / 'twice'}"]))


def test_convert_says_where_the_words_of_a_pivot_lora_are(ti_export, tiny_dir, tmp_path, capsys):
    from dreamsteer.train.convert import run as convert

    backbone = load_backbone(str(tiny_dir))
    load_pivot(backbone, ti_export)
    attach_adapter(backbone, "lora", rank=2)
    adapter = export_adapter(backbone, tmp_path / "lora")
    convert(compose("convert", [f"model.pretrained={tiny_dir}", f"lora={adapter}", "to=kohya", f"out={tmp_path / 'k.safetensors'}"]))
    assert "trained on the pivot words ['<sks>']; pivot/learned_embeds.safetensors" in capsys.readouterr().out
