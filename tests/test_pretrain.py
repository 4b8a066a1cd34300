"""`train pretrain`: the toy model's recipe (VAE, then UNet + text encoder, then GLIGEN) at tiny sizes."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamsteer.data.scenes import GRAMMAR_WORDS, SUBJECT
from dreamsteer.train.config import ConfigError, compose

TINY = [
    "arch.resolution=16",
    "arch.vae_channels=[16,16]",
    "arch.unet_channels=[16,32]",
    "arch.attention_heads=8",
    "arch.text_width=32",
    "arch.text_layers=1",
    "data.batch_size=2",
    "data.num_workers=0",
    "trainer.max_steps=2",
    "trainer.export_every_n_steps=0",
    "optim.warmup_steps=1",
    "logger=none",
]


def _run(stage: str, out, *extra: str):
    from dreamsteer.train.pretrain import run

    return run(compose("pretrain", [f"stage={stage}", f"output_dir={out}", *TINY, *extra]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    vae = _run("vae", root / "vae")
    unet = _run("unet", root / "unet", f"vae={vae / 'vae'}")
    return root, vae, unet


def test_vae_stage_is_seeded_and_sets_the_latent_scale(runs, tmp_path):
    root, vae, _ = runs
    again = _run("vae", tmp_path / "vae")
    a = load_file(vae / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(again / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic from the seed
    import json

    scale = json.loads((vae / "vae" / "config.json").read_text())["scaling_factor"]
    assert scale != 1.0 and np.isfinite(scale)


def test_decoder_fine_tune_keeps_the_encoder_and_the_latent_scale(runs, tmp_path):
    import json

    _, vae, _ = runs
    tuned = _run("vae", tmp_path / "decoder", f"vae={vae / 'vae'}", "optim.train_vae_encoder=false", "optim.lr=0.01")
    before = load_file(vae / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "vae" / "diffusion_pytorch_model.safetensors")
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == key.startswith(("encoder.", "quant_conv.")), key  # only the decoder side moved
    scale = lambda p: json.loads((p / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(tuned) == scale(vae)


def test_unet_stage_writes_a_loadable_model_that_covers_the_grammar(runs):
    from dreamsteer.diffusion.backbone import load_backbone

    _, _, unet = runs
    backbone = load_backbone(str(unet))
    assert backbone.resolution == 16 and backbone.vae_scale_factor == 2
    for word in (*GRAMMAR_WORDS, SUBJECT.token):  # every grammar word is one token (+ start/end)
        assert len(backbone.tokenizer(word).input_ids) == 3, word
    image = backbone.pipeline()("a red circle on a white background", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_unet_stage_with_init_continues_the_model_s_unet_and_text_encoder(runs, tmp_path):
    from dreamsteer.diffusion.backbone import load_backbone

    _, _, unet = runs
    continued = _run("unet", tmp_path / "continued", f"init={unet}", "optim.lr=0.05")
    base, after = load_backbone(str(unet)), load_backbone(str(continued))
    for name, module in (("unet", "unet"), ("text_encoder", "text_encoder")):
        before, trained = getattr(base, module).state_dict(), getattr(after, module).state_dict()
        assert before.keys() == trained.keys()
        assert any(not torch.equal(v, before[k]) for k, v in trained.items()), name  # it trained from the loaded weights
    vae = base.vae.state_dict()
    assert all(torch.equal(v, vae[k]) for k, v in after.vae.state_dict().items())  # the model's own VAE, frozen
    assert after.vae.config.scaling_factor == base.vae.config.scaling_factor
    with pytest.raises(ConfigError, match="arch.resolution"):  # scenes rendered at another size than the model's
        _run("unet", tmp_path / "other", f"init={unet}", "arch.resolution=32")


def test_unet_stage_with_init_and_vae_continues_the_model_on_the_other_vae(runs, tmp_path):
    from dreamsteer.diffusion.backbone import load_backbone

    _, vae, unet = runs
    other = _run("vae", tmp_path / "other_vae", "seed=5")  # another encoder: other latents
    continued = _run("unet", tmp_path / "continued", f"init={unet}", f"vae={other / 'vae'}")
    swapped, base = load_backbone(str(continued)), load_backbone(str(unet))
    new = load_file(other / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, new[k].to(v.dtype)) for k, v in swapped.vae.state_dict().items())  # the VAE given, kept frozen
    assert not all(torch.equal(v, new[k].to(v.dtype)) for k, v in base.vae.state_dict().items())
    trained, before = swapped.unet.state_dict(), base.unet.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())  # the model's UNet trained on from its weights


def test_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    from dreamsteer.lit_modules.pretrain import lr_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = lr_schedule(optimizer, warmup_steps=4, decay_steps=14)["scheduler"]
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = [2.0 * (k + 1) / 4 for k in range(4)]  # linear warm-up to the base rate
    decay = [1.0 + np.cos(np.pi * (k - 4) / 10) for k in range(4, 15)]  # 2 * 0.5 (1 + cos(pi * progress))
    np.testing.assert_allclose(seen, warm + decay, atol=1e-9)
    assert seen[4] == pytest.approx(2.0) and seen[9] == pytest.approx(1.0) and seen[14] == pytest.approx(0.0)
    constant = torch.optim.SGD([param], lr=2.0)
    flat = lr_schedule(constant, warmup_steps=2)["scheduler"]
    for _ in range(3):
        constant.step()
        flat.step()
    assert constant.param_groups[0]["lr"] == 2.0  # no decay without decay_steps


def test_cosine_schedule_decays_over_the_run_s_max_steps(runs, tmp_path):
    from dreamsteer.train.pretrain import build_modules, validate_config

    _, vae, _ = runs
    for stage, extra in (("unet", [f"vae={vae / 'vae'}"]), ("vae", [])):
        cfg = compose("pretrain", [f"stage={stage}", f"output_dir={tmp_path}", *TINY, *extra, "trainer.max_steps=7"])
        assert build_modules(validate_config(cfg)).decay_steps == 0  # constant by default
        cfg = compose("pretrain", [f"stage={stage}", f"output_dir={tmp_path}", *TINY, *extra, "trainer.max_steps=7", "optim.schedule=cosine"])
        assert build_modules(validate_config(cfg)).decay_steps == 7


def test_gligen_stage_trains_only_the_new_layers(runs, tmp_path):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import is_gligen

    _, _, unet = runs
    gligen = _run("gligen", tmp_path / "gligen", f"init={unet}", "optim.lr=0.1")
    base, grounded = load_backbone(str(unet)), load_backbone(str(gligen))
    assert is_gligen(grounded.unet)
    new = dict(grounded.unet.named_parameters())
    for name, p in base.unet.named_parameters():
        assert torch.equal(p, new[name]), name  # the text-to-image model is untouched
    gates = [p for n, p in new.items() if n.endswith("alpha_attn")]
    assert gates and any(g.abs().item() > 0 for g in gates)  # the gates (initialised at 0) learned


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_gligen_stage_with_unfrozen_unet_trains_the_base_weights_too(runs, tmp_path, train_text_encoder):
    from dreamsteer.diffusion.backbone import load_backbone

    _, _, unet = runs
    gligen = _run("gligen", tmp_path / "gligen", f"init={unet}", "optim.lr=0.1", "optim.freeze_unet=false",
                  f"optim.train_text_encoder={train_text_encoder}")
    base, grounded = load_backbone(str(unet)), load_backbone(str(gligen))
    new = dict(grounded.unet.named_parameters())
    moved = [name for name, p in base.unet.named_parameters() if not torch.equal(p, new[name])]
    assert any(n.startswith("down_blocks.0.resnets.") for n in moved) and any(n.startswith("conv_in.") for n in moved)
    text = base.text_encoder.state_dict()
    kept = all(torch.equal(v, grounded.text_encoder.state_dict()[k]) for k, v in text.items())
    assert kept != train_text_encoder  # the text encoder trains with the UNet unless told not to


def _gates(unet) -> dict[str, float]:
    return {n: p.item() for n, p in unet.named_parameters() if n.endswith((".alpha_attn", ".alpha_dense"))}


def test_gate_init_opens_every_gated_attention_and_lets_its_gradient_through(runs, tmp_path):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import add_gated_layers, set_gates
    from dreamsteer.train.pretrain import build_modules, validate_config

    _, _, unet = runs
    cfg = lambda *extra: validate_config(compose("pretrain", ["stage=gligen", f"init={unet}", f"output_dir={tmp_path}", *TINY, *extra]))
    gates = _gates(build_modules(cfg("optim.gate_init=0.5")).unet)
    attn = [v for n, v in gates.items() if n.endswith("alpha_attn")]
    assert len(attn) == len(gates) // 2 >= 2 and attn == [0.5] * len(attn)
    assert all(v == 0 for n, v in gates.items() if n.endswith("alpha_dense"))  # only the attention's gate opens
    assert set(_gates(build_modules(cfg()).unet).values()) == {0.0}  # GLIGEN's start

    # why: the gated attention's output, and so every gradient into it and position_net, is scaled by tanh(alpha_attn)
    for alpha, flows in ((None, False), (0.5, True)):
        module = build_modules(cfg("optim.caption_dropout=0", *([f"optim.gate_init={alpha}"] if alpha is not None else [])))
        batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle on a white background"] * 2,
                 "phrases": [["red circle"]] * 2, "boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5]])] * 2}
        module.training_step(batch, 0).backward()
        grads = [p.grad for n, p in module.unet.named_parameters() if n.startswith("position_net.") and p.grad is not None]
        assert any(g.abs().sum() > 0 for g in grads) == flows, alpha

    # a GLIGEN model given as init keeps its own gates unless gate_init is set
    folder = tmp_path / "opened"
    shutil.copytree(unet, folder)
    opened = add_gated_layers(load_backbone(str(unet)).unet, 0)
    set_gates(opened, 0.25)
    opened.save_pretrained(folder / "unet")
    again = lambda *extra: validate_config(compose("pretrain", ["stage=gligen", f"init={folder}", f"output_dir={tmp_path}", *TINY, *extra]))
    assert {v for n, v in _gates(build_modules(again()).unet).items() if n.endswith("alpha_attn")} == {0.25}
    assert {v for n, v in _gates(build_modules(again("optim.gate_init=-1")).unet).items() if n.endswith("alpha_attn")} == {-1.0}


def test_gligen_stage_from_scratch_trains_unet_and_text_encoder_with_attention_at_every_size(runs, tmp_path):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import is_gligen
    from dreamsteer.train.pretrain import build_modules, validate_config

    _, vae, _ = runs
    args = [f"vae={vae / 'vae'}", "optim.freeze_unet=false", "arch.plain_blocks=0", "optim.lr=0.05"]
    initial = build_modules(validate_config(compose("pretrain", ["stage=gligen", f"output_dir={tmp_path}", *TINY, *args])))
    model = load_backbone(str(_run("gligen", tmp_path / "scratch", *args)))
    assert is_gligen(model.unet)
    assert model.unet.config.down_block_types[0] == "CrossAttnDownBlock2D" and model.unet.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    for trained, start in ((model.text_encoder, initial.text_encoder), (model.unet, initial.unet)):
        before = start.state_dict()
        assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())  # both trained


def test_the_toy_gligen_recipe_runs_at_tiny_sizes_and_its_later_phases_train_only_the_gated_layers(runs, tmp_path):
    """docs/toy.md's four commands for toy-gligen (sizes and steps shrunk): from scratch with the gates open,
    then GLIGEN's new layers alone at high noise with the gates reopened, then at every noise level, then the
    whole UNet again with half the items run without GLIGEN's layers (the text encoder kept)."""
    from safetensors.torch import load_file

    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import is_gligen

    _, vae, _ = runs
    pattern = ["data.fixed_pattern=16", "data.fixed_pattern_cell=4", "optim.noise_offset=0.1"]
    scratch = _run("gligen", tmp_path / "a", f"vae={vae / 'vae'}", "arch.attention_heads=2", "optim.freeze_unet=false",
                   "optim.gate_init=0.5", *pattern)
    high = _run("gligen", tmp_path / "b", f"init={scratch}", "optim.gate_init=0.5", "optim.min_timestep=900", "optim.lr=0.05", *pattern)
    every = _run("gligen", tmp_path / "c", f"init={high}", "optim.timesteps=cubic", "optim.lr=0.05", *pattern)
    assert is_gligen(load_backbone(str(every)).unet)
    weights = [load_file(next((folder / "unet").glob("*.safetensors"))) for folder in (scratch, high, every)]
    for before, after in zip(weights, weights[1:]):
        gated = [k for k in after if k.startswith("position_net.") or ".fuser." in k]
        assert gated and any(not torch.equal(after[k], before[k]) for k in gated)  # the new layers train
        assert all(torch.equal(after[k], before[k]) for k in after if k not in gated)  # the UNet they sit in does not
    plain = _run("gligen", tmp_path / "d", f"init={every}", "optim.freeze_unet=false", "optim.train_text_encoder=false",
                 "optim.ungrounded_p=0.5", "optim.schedule=cosine", "optim.lr=0.05", *pattern)
    (before, after), (text_before, text_after) = [[load_file(next((folder / part).glob("*.safetensors"))) for folder in (every, plain)]
                                                  for part in ("unet", "text_encoder")]
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("conv_in."))  # the UNet trains
    assert all(torch.equal(text_after[k], text_before[k]) for k in text_after)  # the phrases' embeddings stay what the layers read


def test_the_toy_recipe_s_later_phases_run_at_tiny_sizes_each_from_the_one_before(runs, tmp_path):
    """The ten-phase toy's commands after its first base (docs/toy_experiments.md; sizes and steps shrunk): the VAE
    fine-tuned with the flat-background term, the UNet and text encoder continued on it with a cosine schedule,
    then continued on scenes with two-tone objects in the subject's colors on every other shape."""
    from dreamsteer.diffusion.backbone import load_backbone

    _, vae, unet = runs
    flat = _run("vae", tmp_path / "flat", f"vae={vae / 'vae'}", "optim.flat_latent_weight=0.2", "data.two_tone_p=0.3", "optim.lr=0.01")
    cosine = ["optim.schedule=cosine", "optim.noise_offset=0.1", "optim.lr=0.05"]
    on_flat = _run("unet", tmp_path / "on_flat", f"init={unet}", f"vae={flat / 'vae'}", *cosine)
    pair = _run("unet", tmp_path / "pair", f"init={on_flat}", "data.two_tone_p=0.2", "data.two_tone_leave_out=subject", *cosine)
    weights = {folder: {path.parent.name: load_file(path) for path in folder.glob("*/*.safetensors")}
               for folder in (vae, flat, unet, on_flat, pair)}  # a VAE run exports vae/ only
    assert any(not torch.equal(weights[flat]["vae"][k], v) for k, v in weights[vae]["vae"].items())  # the VAE moved
    for before, after in ((unet, on_flat), (on_flat, pair)):
        assert all(torch.equal(weights[after]["vae"][k], v) for k, v in weights[flat]["vae"].items())  # on the flat VAE, frozen
        for part in ("unet", "text_encoder"):  # each phase trains on from the last one's weights
            assert any(not torch.equal(weights[after][part][k], v) for k, v in weights[before][part].items()), (after, part)
    assert load_backbone(str(pair)).resolution == 16


@pytest.mark.parametrize("grounding_dropout", [None, 0.999])
def test_grounding_dropout_drops_the_boxes_apart_from_the_caption(runs, grounding_dropout):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import add_gated_layers
    from dreamsteer.diffusion.toy import toy_scheduler
    from dreamsteer.lit_modules.pretrain import DiffusionPretrainModule

    _, _, unet = runs
    base = load_backbone(str(unet))
    module = DiffusionPretrainModule(
        base.vae, base.text_encoder, base.tokenizer, add_gated_layers(base.unet, 0), toy_scheduler(), lr=1e-3, warmup_steps=1,
        caption_dropout=0.0, ema_decay=0.9, train_text_encoder=False, grounded=True, grounding_dropout=grounding_dropout,
    )
    seen = {}
    grounding, encode_text = module.grounding, module.encode_text

    def record_grounding(phrases, boxes, keep):
        seen["keep"] = keep
        return grounding(phrases, boxes, keep)

    def record_captions(captions):
        seen["captions"] = list(captions)
        return encode_text(captions)

    module.grounding, module.encode_text = record_grounding, record_captions
    batch = {"pixel_values": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a red circle on a white background"] * 4,
             "phrases": [["red circle"]] * 4, "boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5]])] * 4}
    module.training_step(batch, 0)
    assert seen["captions"] == batch["caption"]  # no caption dropped
    # None: the boxes go with the caption (all kept); 0.999: dropped on their own
    assert seen["keep"].tolist() == ([True] * 4 if grounding_dropout is None else [False] * 4)


def test_ungrounded_items_run_the_unet_with_gligen_s_layers_off(runs, tmp_path):
    from dreamsteer.diffusion.gligen import fuser_restored, set_fuser
    from dreamsteer.train.pretrain import build_modules, validate_config

    _, _, unet = runs
    cfg = lambda *extra: validate_config(compose("pretrain", ["stage=gligen", f"init={unet}", f"output_dir={tmp_path}", *TINY,
                                                              "optim.freeze_unet=false", "optim.gate_init=0.5", *extra]))
    module = build_modules(cfg("optim.ungrounded_p=0.5"))
    torch.manual_seed(0)
    z_t, t = torch.randn(4, 4, 8, 8), torch.tensor([900, 600, 300, 100])
    text = module.encode_text(["a red circle on a white background", "a blue square on a black background"] * 2)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([[0.4, 0.2, 0.9, 0.8]])] * 2
    gligen = module.grounding([["red circle"], ["blue square"]] * 2, boxes, torch.ones(4, dtype=torch.bool))
    plain = torch.tensor([True, False, False, True])
    with torch.no_grad():
        pred = module.grounded_prediction(z_t, t, text, gligen, plain)
        on = module.unet(z_t, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
        with fuser_restored(module.unet):  # the switch scheduled sampling flips
            set_fuser(module.unet, False)
            off = module.unet(z_t, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
    assert (on - off).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # the layers change every item's prediction
    torch.testing.assert_close(pred[plain], off[plain])
    torch.testing.assert_close(pred[~plain], on[~plain])

    # an item without GLIGEN's layers trains the UNet and gives the layers nothing; the default trains them
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle on a white background"] * 2,
             "phrases": [["red circle"]] * 2, "boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5]])] * 2}
    for extra, layers_learn in ((["optim.ungrounded_p=0.999"], False), ([], True)):
        module = build_modules(cfg("optim.caption_dropout=0", *extra))
        module.training_step(batch, 0).backward()
        grads = {n: p.grad for n, p in module.unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(".fuser." in n or n.startswith("position_net.") for n in grads) == layers_learn, extra
        assert any(n.startswith("conv_in.") for n in grads), extra

    for extra in (["optim.freeze_unet=true"], ["optim.ungrounded_p=1"], ["trainer.devices=2", "trainer.strategy=ddp"], ["trainer.devices=2"]):
        with pytest.raises(ConfigError, match="optim.ungrounded_p|trainer.strategy"):
            cfg("optim.ungrounded_p=0.5", *extra)
    cfg("optim.ungrounded_p=0.5", "trainer.devices=2", "trainer.strategy=ddp_find_unused_parameters_true")  # accepted
    with pytest.raises(ConfigError, match="optim.ungrounded_p"):  # GLIGEN's layers only exist in stage=gligen
        validate_config(compose("pretrain", ["stage=unet", "vae=x", "optim.ungrounded_p=0.5", f"output_dir={tmp_path}"]))


def test_phrase_dropout_drops_objects_boxes_one_by_one_and_keeps_the_caption(runs, tmp_path):
    from dreamsteer.train.pretrain import build_modules, validate_config

    _, _, unet = runs
    cfg = lambda *extra: validate_config(compose("pretrain", ["stage=gligen", f"init={unet}", f"output_dir={tmp_path}", *TINY,
                                                              "optim.caption_dropout=0", *extra]))
    batch = {"pixel_values": torch.rand(64, 3, 16, 16) * 2 - 1, "caption": ["a red circle and a blue square on a white background"] * 64,
             "phrases": [["red circle", "blue square"]] * 64, "boxes": [torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])] * 64}
    masks = {}
    for p in (0.0, 0.5):
        module = build_modules(cfg(f"optim.phrase_dropout={p}"))
        seen = {}
        encode_text, predict = module.encode_text, module.grounded_prediction

        def record_captions(captions, encode_text=encode_text, seen=seen):
            seen["captions"] = list(captions)
            return encode_text(captions)

        def record_masks(z_t, t, text, gligen, plain, predict=predict, seen=seen):
            seen["masks"] = gligen["masks"]
            return predict(z_t, t, text, gligen, plain)

        module.encode_text, module.grounded_prediction = record_captions, record_masks
        torch.manual_seed(0)
        module.training_step(batch, 0)
        assert seen["captions"] == batch["caption"]  # the caption still names every object
        masks[p] = seen["masks"]
    assert masks[0.0][:, :2].eq(1).all() and masks[0.0][:, 2:].eq(0).all()
    kept = masks[0.5][:, :2]
    assert masks[0.5][:, 2:].eq(0).all() and set(kept.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < kept.mean() < 0.7 and (kept[:, 0] != kept[:, 1]).any()  # each object on its own, not the item's boxes together
    with pytest.raises(ConfigError, match="optim.phrase_dropout"):
        validate_config(compose("pretrain", ["stage=unet", "vae=x", "optim.phrase_dropout=0.3", f"output_dir={tmp_path}"]))


def test_grounding_puts_each_item_s_phrases_and_boxes_in_its_own_slots(runs):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import MAX_OBJECTS, add_gated_layers
    from dreamsteer.diffusion.toy import toy_scheduler
    from dreamsteer.lit_modules.pretrain import DiffusionPretrainModule

    _, _, unet = runs
    base = load_backbone(str(unet))
    module = DiffusionPretrainModule(base.vae, base.text_encoder, base.tokenizer, add_gated_layers(base.unet, 0), toy_scheduler(),
                                     lr=1e-3, warmup_steps=1, caption_dropout=0.0, ema_decay=0.9, train_text_encoder=False, grounded=True)
    phrases = [["red circle", "blue star"], ["green square"], ["purple triangle", "yellow circle", "red star"]]
    boxes = [torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]]), torch.tensor([[0.0, 0.1, 0.2, 0.3]]),
             torch.tensor([[0.6, 0.0, 0.9, 0.3], [0.1, 0.6, 0.4, 0.9], [0.4, 0.4, 0.6, 0.6]])]
    keep = torch.tensor([True, False, True])
    got = module.grounding(phrases, boxes, keep)
    for i, (item, item_boxes) in enumerate(zip(phrases, boxes)):  # item by item, each phrase encoded alone
        n = len(item)
        assert torch.equal(got["boxes"][i, :n], item_boxes) and not got["boxes"][i, n:].any()
        assert got["masks"][i].tolist() == [float(keep[i])] * n + [0.0] * (MAX_OBJECTS - n)
        for j, phrase in enumerate(item):
            ids = module.tokenizer([phrase], return_tensors="pt").input_ids
            with torch.no_grad():
                alone = module.text_encoder(ids).pooler_output[0]
            torch.testing.assert_close(got["positive_embeddings"][i, j], alone, atol=1e-5, rtol=1e-5)
        assert not got["positive_embeddings"][i, n:].any()


def test_export_holds_the_ema_of_the_trained_weights_and_the_ema_resumes(runs):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.toy import toy_scheduler
    from dreamsteer.lit_modules.pretrain import DiffusionPretrainModule

    _, _, unet = runs
    base = load_backbone(str(unet))
    module = DiffusionPretrainModule(base.vae, base.text_encoder, base.tokenizer, base.unet, toy_scheduler(), lr=1e-3, warmup_steps=1,
                                     caption_dropout=0.0, ema_decay=0.5, train_text_encoder=True)
    name = "conv_in.weight"
    weight = dict(base.unet.named_parameters())[name]
    expected = weight.detach().clone()
    for n in range(1, 4):  # three optimizer steps, written out: d_n = min(0.5, (1 + n) / (10 + n))
        with torch.no_grad():
            weight.add_(torch.randn_like(weight))
        module.on_train_batch_end(None, None, 0)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * weight.detach()
    raw = weight.detach().clone()
    exported = module.export()
    assert torch.allclose(dict(exported.unet.named_parameters())[name], expected, atol=1e-6)
    assert not torch.allclose(expected, raw) and torch.equal(weight, raw)  # the live weights are untouched
    assert exported.unet is not base.unet and exported.text_encoder is not base.text_encoder  # both trained: both averaged copies
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    again = DiffusionPretrainModule(base.vae, base.text_encoder, base.tokenizer, base.unet, toy_scheduler(), lr=1e-3, warmup_steps=1,
                                    caption_dropout=0.0, ema_decay=0.5, train_text_encoder=True)
    again.on_load_checkpoint(checkpoint)
    assert torch.allclose(dict(again.export().unet.named_parameters())[name], expected, atol=1e-6)
    with pytest.raises(ValueError, match="no EMA state"):
        again.on_load_checkpoint({})


def test_background_cells_are_the_latent_cells_whose_pixels_all_show_the_background():
    from dreamsteer.lit_modules.pretrain import background_cells

    x = torch.full((2, 3, 8, 8), -0.2)  # a flat background in both images
    x[0, :, 2:5, 3:5] = 0.9  # an object over pixel rows 2-4, columns 3-4
    x[1, 1, 7, 0] = -0.19  # within the tolerance of the background
    x[1, 2, 0, 7] = -0.1  # one channel of one pixel off: its cell is not background
    cells = background_cells(x, factor=2)
    assert cells.shape == (2, 1, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                block = x[b, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                assert bool(cells[b, 0, i, j]) == bool(((block + 0.2).abs() <= 0.02).all()), (b, i, j)
    assert not cells[0, 0, 1:3, 1:3].any() and cells[0, 0, 0, 0] and cells[1, 0, 3, 0] and not cells[1, 0, 0, 3]


def test_flat_background_loss_is_the_background_spread_over_the_latent_spread():
    from dreamsteer.lit_modules.pretrain import flat_background_loss

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 5, 5, generator=g)
    cells = torch.rand(3, 1, 5, 5, generator=g) < 0.6
    cells[2] = False  # an image without background cells adds nothing
    within, count = 0.0, 0
    for b in range(3):
        for c in range(4):
            values = mu[b, c][cells[b, 0]]
            if len(values):
                within += float(((values - values.mean()) ** 2).sum())
                count += len(values)
    spread = float(np.mean([mu[:, c].flatten().var().item() for c in range(4)]))
    expected = within / count / spread
    assert flat_background_loss(mu, cells).item() == pytest.approx(expected, rel=1e-5)
    assert flat_background_loss(3 * mu, cells).item() == pytest.approx(expected, rel=1e-5)  # shrinking the latent does not pay
    flat = mu.clone()
    flat[0, :, cells[0, 0]] = 1.5  # a constant background in image 0 only
    flat[1, :, cells[1, 0]] = -0.5
    assert flat_background_loss(flat, cells).item() == pytest.approx(0.0, abs=1e-7)
    assert flat_background_loss(mu, torch.zeros_like(cells)).item() == 0.0


def test_vae_stage_adds_the_flat_background_term_to_its_loss(runs):
    from diffusers import AutoencoderKL

    from dreamsteer.lit_modules.pretrain import VaePretrainModule, background_cells, flat_background_loss

    _, vae_dir, _ = runs
    x = torch.full((2, 3, 16, 16), 0.0)  # gray, the image's zero, with one object each
    x[0, :, 3:8, 4:9] = torch.tensor([0.9, -0.8, -0.8])[:, None, None]
    x[1, :, 9:14, 2:6] = torch.tensor([-0.8, -0.8, 0.9])[:, None, None]
    losses = {}
    for weight in (0.0, 0.5):
        vae = AutoencoderKL.from_pretrained(vae_dir / "vae").eval()
        losses[weight] = VaePretrainModule(vae, lr=1e-3, kl_weight=1e-6, flat_weight=weight).training_step({"pixel_values": x}, 0)
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean
    flat = flat_background_loss(mu, background_cells(x, 2))
    assert flat > 0
    assert (losses[0.5] - losses[0.0]).item() == pytest.approx(0.5 * flat.item(), rel=1e-4)


def test_bad_config_fails_before_training(tmp_path):
    from dreamsteer.train.pretrain import run

    with pytest.raises(ConfigError, match="'vae'"):
        run(compose("pretrain", ["stage=unet", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'stage'"):
        run(compose("pretrain", ["stage=lora", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.folder"):
        run(compose("pretrain", ["stage=vae", "data.source=folder", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.two_tone_p"):  # GLIGEN's phrases and boxes are of one-color objects
        run(compose("pretrain", ["stage=gligen", "init=x", "data.two_tone_p=0.3", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'init'"):
        run(compose("pretrain", ["stage=gligen", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="optim.freeze_unet"):  # from scratch, the whole UNet trains
        run(compose("pretrain", ["stage=gligen", "vae=x", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="optim.gate_init"):  # gates exist only in stage=gligen
        run(compose("pretrain", ["stage=unet", "vae=x", "optim.gate_init=0.5", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="arch.plain_blocks"):
        run(compose("pretrain", ["stage=unet", "vae=x", "arch.plain_blocks=3", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="arch.attention_heads"):  # 3 heads cannot split 32 channels
        run(compose("pretrain", ["stage=unet", "vae=x", "arch.attention_heads=3", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="trainer.max_time"):
        run(compose("pretrain", ["stage=vae", "trainer.max_time=10m", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'vae'"):  # with init, a VAE to swap in must exist
        run(compose("pretrain", ["stage=unet", "vae=x", "init=toy", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'init'"):
        run(compose("pretrain", ["stage=vae", "init=toy", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="optim.schedule"):
        run(compose("pretrain", ["stage=vae", "optim.schedule=linear", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.fixed_pattern"):  # the detector's tolerance
        run(compose("pretrain", ["stage=unet", "vae=x", "data.fixed_pattern=40", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.fixed_pattern"):  # only the renderer draws it
        run(compose("pretrain", ["stage=unet", "vae=x", "data.source=folder", "data.folder=x", "data.fixed_pattern=8", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="optim.flat_latent_weight"):  # the term shapes the encoder, which a decoder fine-tune keeps
        run(compose("pretrain", ["stage=vae", "vae=x", "optim.train_vae_encoder=false", "optim.flat_latent_weight=0.2", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="optim.flat_latent_weight"):
        run(compose("pretrain", ["stage=unet", "vae=x", "optim.flat_latent_weight=0.2", f"output_dir={tmp_path}"]))


def test_max_time_stops_the_run_early_and_still_exports(tmp_path):
    out = _run("vae", tmp_path / "vae", "trainer.max_steps=100000", "trainer.max_time=00:00:00:01")
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # exported at the end (export_every_n_steps=0)
    steps = torch.load(tmp_path / "vae" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 1 <= steps < 100000


class _ZeroUNet(torch.nn.Module):
    """Predicts eps = 0, so the loss is the mean square of the noise the module drew."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    def forward(self, z_t, t, encoder_hidden_states, **kwargs):
        return type("Out", (), {"sample": torch.zeros_like(z_t)})()


@pytest.mark.parametrize("offset, weighting", [(0.0, "eps"), (0.5, "eps"), (0.0, "x0"), (0.5, "v")])
def test_unet_loss_uses_offset_noise_and_weighs_each_item_by_its_noise_level(runs, offset, weighting):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.toy import toy_scheduler
    from dreamsteer.lit_modules.pretrain import DiffusionPretrainModule

    _, _, unet = runs
    base = load_backbone(str(unet))
    scheduler = toy_scheduler()
    module = DiffusionPretrainModule(
        base.vae, base.text_encoder, base.tokenizer, _ZeroUNet(base.unet), scheduler, lr=1e-3, warmup_steps=1,
        caption_dropout=0.0, ema_decay=0.9, train_text_encoder=False, noise_offset=offset, loss_weighting=weighting,
    )
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    batch = {"pixel_values": x, "caption": ["a red circle on a white background"] * 3}
    torch.manual_seed(7)
    loss = module.training_step(batch, 0)
    # the same draws in the same order, written out: caption keep, timesteps, noise, offset
    torch.manual_seed(7)
    torch.rand(3)
    t = torch.randint(0, 1000, (3,))
    with torch.no_grad():
        z = base.vae.encode(x).latent_dist.mean  # randn_like follows z's strides, so draw alike
    n = torch.randn_like(z)
    m = torch.randn(3, z.shape[1], 1, 1) if offset else torch.zeros(3, z.shape[1], 1, 1)
    per_item = ((n + offset * m).double() ** 2).mean(dim=(1, 2, 3))
    # SNR(t) = a / (1 - a); x0's error is the epsilon error / sqrt(SNR), v's is the epsilon error / sqrt(a)
    a = scheduler.alphas_cumprod[t].double()
    w = {"eps": torch.ones_like(a), "x0": (1 - a) / a, "v": 1 / a}[weighting]
    assert torch.allclose(loss.double(), (w * per_item).mean(), rtol=1e-5)
    if weighting != "eps":
        assert not torch.allclose(loss.double(), per_item.mean(), rtol=1e-2)  # the weights are not all 1
        with pytest.raises(ConfigError, match="optim.loss_weighting"):
            from dreamsteer.train.pretrain import validate_config

            validate_config(compose("pretrain", ["optim.loss_weighting=snr", "output_dir=x"]))


def test_cubic_timesteps_follow_the_formula_and_favour_high_noise(runs):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.toy import toy_scheduler
    from dreamsteer.lit_modules.pretrain import DiffusionPretrainModule

    _, _, unet = runs
    base = load_backbone(str(unet))
    module = DiffusionPretrainModule(
        base.vae, base.text_encoder, base.tokenizer, base.unet, toy_scheduler(),
        lr=1e-3, warmup_steps=1, caption_dropout=0.0, ema_decay=0.9, train_text_encoder=False, timesteps="cubic",
    )
    torch.manual_seed(3)
    t = module.draw_timesteps(4000)
    torch.manual_seed(3)
    u = torch.rand(4000)
    ref = torch.floor(1000 * (1 - u**3)).long()
    assert torch.equal(t, torch.where(ref == 1000, 999, ref))  # fp32: 1 - u^3 rounds to 1 for u < ~0.005
    # P(t >= 500) = P(u^3 <= 1/2) = 0.794 (uniform: 0.5)
    assert abs((t >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.03
    with pytest.raises(ConfigError, match="optim.timesteps"):
        from dreamsteer.train.pretrain import validate_config

        validate_config(compose("pretrain", ["optim.timesteps=log", "output_dir=x"]))


@pytest.mark.parametrize("timesteps", ["uniform", "cubic"])
def test_timestep_range_from_the_config_bounds_either_draw(runs, tmp_path, timesteps):
    from dreamsteer.train.pretrain import build_modules, validate_config

    _, _, unet = runs
    cfg = validate_config(compose("pretrain", ["stage=unet", f"init={unet}", f"optim.timesteps={timesteps}", "optim.min_timestep=900",
                                               "optim.max_timestep=980", f"output_dir={tmp_path}", *TINY]))
    module = build_modules(cfg)
    torch.manual_seed(5)
    t = module.draw_timesteps(4000)
    torch.manual_seed(5)
    if timesteps == "uniform":
        ref = torch.randint(900, 980, (4000,))
    else:
        u = torch.rand(4000)
        ref = 900 + torch.floor(80 * (1 - u**3)).long()
        ref = torch.where(ref == 980, 979, ref)  # fp32: 1 - u^3 rounds to 1 for u < ~0.005
    assert torch.equal(t, ref)
    assert t.min() == 900 and t.max() == 979  # both ends drawn, the upper bound exclusive
    for bad in (["optim.min_timestep=500", "optim.max_timestep=500"], ["optim.max_timestep=1001"], ["optim.min_timestep=-1"]):
        with pytest.raises(ConfigError, match="optim.min_timestep"):
            validate_config(compose("pretrain", [*bad, "output_dir=x"]))


def test_a_resume_with_another_checkpoint_interval_rewrites_last_ckpt(runs, tmp_path):
    _, vae, _ = runs
    common = [f"vae={vae / 'vae'}"]
    _run("unet", tmp_path / "run", *common, "trainer.checkpoint_every_n_steps=1")
    _run("unet", tmp_path / "run", *common, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "ckpt_path=last")
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert not [f for f in files if "-v" in f], files  # Lightning would write last-v1.ckpt beside a stale last.ckpt
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_run_stopped_and_resumed_ends_with_the_weights_of_one_run_through(tmp_path):
    """The resumed run trains on the scenes after those it saw (Lightning alone would start the dataset over); the
    VAE stage draws no noise, so the weights match bit for bit."""
    one = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1", "optim.lr=0.01"]
    through = _run("vae", tmp_path / "through", *one)
    _run("vae", tmp_path / "stopped", *one, "trainer.max_steps=2")
    resumed = _run("vae", tmp_path / "stopped", *one, "ckpt_path=last")
    a = load_file(through / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_pattern_reaches_the_training_images(tmp_path):
    from dreamsteer.data.scenes import random_scene
    from dreamsteer.train.pretrain import dataset, validate_config

    cfg = validate_config(compose("pretrain", ["stage=vae", "data.fixed_pattern=12", "seed=4", f"output_dir={tmp_path}", *TINY]))
    pixels = dataset(cfg, 16)[3]["pixel_values"]
    expected = torch.from_numpy(np.asarray(random_scene((4, 3), 1, 2, 16, pattern=12).image).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    plain = torch.from_numpy(np.asarray(random_scene((4, 3), 1, 2, 16).image).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(pixels, expected, atol=1e-6) and not torch.allclose(pixels, plain, atol=0.02)
    cfg = validate_config(compose("pretrain", ["stage=vae", "data.fixed_pattern=12", "data.fixed_pattern_cell=4", "seed=4",
                                               f"output_dir={tmp_path}", *TINY]))
    coarse = torch.from_numpy(np.asarray(random_scene((4, 3), 1, 2, 16, pattern=12, pattern_cell=4).image).astype(np.float32))
    assert torch.allclose(dataset(cfg, 16)[3]["pixel_values"], coarse.permute(2, 0, 1) / 127.5 - 1, atol=1e-6)
    with pytest.raises(ConfigError, match="data.fixed_pattern_cell"):  # cells must tile the image
        validate_config(compose("pretrain", ["stage=vae", "data.fixed_pattern=12", "data.fixed_pattern_cell=3", f"output_dir={tmp_path}", *TINY]))


def test_two_tone_objects_reach_the_unet_without_the_subjects_colors(tmp_path):
    """`data.two_tone_p` in stage unet captions two-tone objects ("... with a yellow center") in words the
    tokenizer has, and never draws the subject's pair of colors, which the VAE stage does draw."""
    from dreamsteer.data.scenes import GRAMMAR_WORDS, SHAPES, SUBJECT
    from dreamsteer.diffusion.toy import toy_tokenizer
    from dreamsteer.train.pretrain import dataset, validate_config

    def captions(stage, *overrides):
        cfg = validate_config(compose("pretrain", [f"stage={stage}", f"vae={tmp_path}", "data.two_tone_p=1", "trainer.max_steps=100",
                                                   "data.batch_size=4", f"output_dir={tmp_path}", *TINY, *overrides]))
        return [dataset(cfg, 16)[i]["caption"] for i in range(400)]

    subject_words = f"{SUBJECT.color} {SUBJECT.shape} with a {SUBJECT.inner_color} center"
    unet_captions = captions("unet")
    assert all(" center" in c for c in unet_captions)
    assert not any(SUBJECT.token in c or f"{SUBJECT.color} {s} with a {SUBJECT.inner_color}" in c for c in unet_captions for s in SHAPES)
    assert any(SUBJECT.token in c for c in captions("vae"))  # the VAE still learns to draw the subject
    # data.two_tone_leave_out=subject: the subject's colors on the other shapes, never the subject
    other_shapes = captions("unet", "data.two_tone_leave_out=subject")
    assert not any(SUBJECT.token in c or subject_words in c for c in other_shapes)
    assert {s for s in SHAPES if s != SUBJECT.shape} == {s for s in SHAPES for c in other_shapes
                                                            if f"{SUBJECT.color} {s} with a {SUBJECT.inner_color} center" in c}
    # data.two_tone_leave_out=subject_shape: circles only in one color, the other shapes two-tone
    no_circle_centers = captions("unet", "data.two_tone_leave_out=subject_shape")
    assert not any(f"{SUBJECT.shape} with a" in c for c in no_circle_centers)
    assert any(f" {SUBJECT.shape}" in c for c in no_circle_centers)
    assert {s for s in SHAPES if s != SUBJECT.shape} == {s for s in SHAPES for c in no_circle_centers if f"{s} with a" in c}
    with pytest.raises(ConfigError, match="data.two_tone_leave_out"):  # "nothing" would put the subject into the UNet's world
        captions("unet", "data.two_tone_leave_out=nothing")
    tokenizer = toy_tokenizer([*GRAMMAR_WORDS, SUBJECT.token], 24)  # the vocabulary of a model from scratch
    assert len(tokenizer(subject_words).input_ids) == len(subject_words.split()) + 2  # one token per word


def test_position_words_reach_the_training_captions_and_the_new_tokenizer(runs, tmp_path):
    """`data.position_words_p` names objects' places in the captions the dataset gives, and a model from
    scratch gets one token per position word; `init` whose tokenizer lacks them is refused before training."""
    from dreamsteer.data.scenes import POSITION_WORDS
    from dreamsteer.train.pretrain import build_modules, dataset, validate_config

    _, vae, unet = runs
    cfg = validate_config(compose("pretrain", ["stage=unet", f"vae={vae / 'vae'}", "data.position_words_p=1", f"output_dir={tmp_path}", *TINY]))
    captions = [dataset(cfg, 16)[i]["caption"] for i in range(4)]
    assert all(any(f" {w} " in c for w in POSITION_WORDS) for c in captions), captions
    tokenizer = build_modules(cfg).tokenizer
    for word in POSITION_WORDS:
        assert len(tokenizer(word).input_ids) == 3, word
    plain = validate_config(compose("pretrain", ["stage=unet", f"vae={vae / 'vae'}", f"output_dir={tmp_path}", *TINY]))
    assert len(build_modules(plain).tokenizer("bottom").input_ids) > 3  # the shipped vocabulary stays as it was
    assert not any(f" {w} " in dataset(plain, 16)[i]["caption"] for i in range(4) for w in POSITION_WORDS)
    with pytest.raises(ConfigError, match="data.position_words_p"):  # its tokenizer has no "bottom"
        build_modules(validate_config(compose("pretrain", ["stage=gligen", f"init={unet}", "data.position_words_p=0.5",
                                                           f"output_dir={tmp_path}", *TINY])))
    with pytest.raises(ConfigError, match="data.position_words_p"):
        validate_config(compose("pretrain", ["stage=vae", "data.position_words_p=0.5", f"output_dir={tmp_path}", *TINY]))
    with pytest.raises(ConfigError, match="data.position_words_p"):
        validate_config(compose("pretrain", ["stage=unet", "vae=x", "data.position_words_p=1.5", f"output_dir={tmp_path}", *TINY]))


def test_captions_longer_than_the_tokenizer_are_refused_before_training(runs, tmp_path):
    """Two two-tone objects with their places ("a red circle with a green center top left and a ... on a white
    background") are 25 tokens with start and end: more than the default arch.max_tokens 24, whose truncation
    would drop the background. Refused before training; a larger arch.max_tokens keeps every caption whole."""
    from dreamsteer.train.pretrain import build_modules, dataset, validate_config

    _, vae, _ = runs
    base = ["stage=unet", f"vae={vae / 'vae'}", f"output_dir={tmp_path}", *TINY, "data.two_tone_p=1", "data.position_words_p=1"]
    with pytest.raises(ConfigError, match="is 25 tokens"):
        build_modules(validate_config(compose("pretrain", base)))
    build_modules(validate_config(compose("pretrain", [*base[:-1], "data.position_words_p=0"])))  # 21 tokens fit
    cfg = validate_config(compose("pretrain", [*base, "arch.max_tokens=25"]))
    tokenizer = build_modules(cfg).tokenizer
    lengths = [len(tokenizer(dataset(cfg, 64)[i]["caption"]).input_ids) for i in range(64)]
    assert max(lengths) <= 25 and 25 in lengths  # the longest the scenes give, and nothing truncated
