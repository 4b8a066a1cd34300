"""The DreamSteerer module's parameter gradient against a chain-rule computation written here from raw UNet
calls (float64, every baseline, subject mask on, lambda_ms > 0), and the wiring around it: the mask comes from
the pre-trained model, the mode-shifting images from the personalized model on y_ref, the guidance's source
branch from each sample's own starting noise. The gradient is also checked for a LoRA on the tiny SDXL model, whose
raw UNet calls get their text inputs and added conditions from diffusers' SDXL pipeline."""
from __future__ import annotations

import json

import pytest
import torch

import dreamsteer.lit_modules.dreamsteerer as dreamsteerer
from dreamsteer.diffusion.adapters import attach_adapter
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.distill.guided_sampling import ddim_sample
from dreamsteer.distill.subject_mask import subject_mask
from dreamsteer.lit_modules.dreamsteerer import DreamSteererModule, EDSDConfig, MaskConfig, MemoryConfig, ModeShiftConfig, OptimConfig
from tests.conftest import direct_conditioning

SOURCE = "a photo of a cat next to a mirror"
ADAPTERS = {  # kind: (attach config, ref prompt)
    "lora": (dict(rank=4), "a photo of a sks cat next to a mirror"),
    "textual_inversion": (dict(tokens=["<sks>"], initializer_token="cat"), "a photo of a <sks> next to a mirror"),
    "custom_diffusion": (dict(modifier_tokens=["<new1>"], initializer_token="cat"), "a photo of a <new1> cat next to a mirror"),
    "dreambooth": (dict(), "a photo of a sks cat next to a mirror"),
}
MASK = MaskConfig(timesteps=[300], threshold=0.4)


def personalized(tiny_dir, kind: str, dtype: torch.dtype = torch.float64):
    """A tiny backbone with a `kind` adapter moved off its initialization (as training would)."""
    bb = load_backbone(str(tiny_dir))
    torch.manual_seed(0)  # LoRA's initialization
    attach_adapter(bb, kind, **ADAPTERS[kind][0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.adapter.trainable_parameters(bb):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    bb.to(dtype=dtype)
    if kind == "dreambooth":  # the pre-trained branch the adapter swaps in follows the cast too
        bb.adapter.base_unet.to(dtype)
    if kind == "custom_diffusion":
        bb.adapter._originals = {key: w.to(dtype) for key, w in bb.adapter._originals.items()}
    return bb


def module_for(bb, kind: str, edsd: EDSDConfig | None = None, micro_batch: int = 0, gradient_checkpointing: bool = False,
               **mode_shift) -> DreamSteererModule:
    z_src = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2), dtype=bb.dtype)
    ms = dict(n_ms=2, sampling_steps=1, guidance="none", lambda_ms=0.7) | mode_shift
    return DreamSteererModule(bb, z_src, SOURCE, ADAPTERS[kind][1], "cat", edsd or EDSDConfig(), ModeShiftConfig(**ms), MASK,
                              OptimConfig(lr={kind: 1e-2}), progress=False,
                              memory=MemoryConfig(gradient_checkpointing, micro_batch))


def unet(bb, x, t, prompt):
    hidden, kwargs = direct_conditioning(bb, [prompt] * x.shape[0], x)
    return bb.unet(x, t.expand(x.shape[0]), encoder_hidden_states=hidden, **kwargs).sample


def reference_gradient(module: DreamSteererModule, step: int, swap: bool = False, flip_j: bool = False,
                       other_eps: bool = False) -> list[torch.Tensor]:
    """d/dphi of ||M (eps_phi(x_hat_t) - eps_phi0(x_t_src, y_src))||^2 / N + lambda_ms L_ms with d eps/d x_hat_t
    replaced by J*I, from raw UNet calls. `swap` exchanges the null and conditional predictions, `flip_j` uses
    -J, `other_eps` noises the source with another eps: each must give another gradient."""
    bb, cfg, ms = module.bb, module.edsd_cfg, module.ms_cfg
    draw = module.draw(step)  # the step's t, eps and mode-shifting noise (its randomness, not its arithmetic)
    t, eps = draw.t, draw.eps
    if other_eps:
        eps = torch.randn(eps.shape, generator=torch.Generator().manual_seed(99), dtype=eps.dtype)
    a = bb.scheduler.alphas_cumprod[t].to(eps.dtype).reshape(1, 1, 1, 1)
    z_src, mask = module.z_src, module.subject.mask.to(eps.dtype)
    x_t_src = a.sqrt() * z_src + (1 - a).sqrt() * eps
    with torch.no_grad(), bb.adapter_disabled():
        e0_null, e0_src = unet(bb, x_t_src, t, ""), unet(bb, x_t_src, t, SOURCE)
    target_cfg = e0_null + cfg.guidance_src * (e0_src - e0_null)
    target = target_cfg if cfg.residual_cfg else e0_src
    ref, null = module.ref_prompt, ""
    if swap:
        ref, null = null, ref
    e_null, e_ref = unet(bb, x_t_src, t, null), unet(bb, x_t_src, t, ref)
    d = e_null + cfg.guidance_ref * (e_ref - e_null) - target_cfg
    x_hat = a.sqrt() * (z_src - cfg.eta * mask * d) + (1 - a).sqrt() * eps
    jacobian = -cfg.jacobian if flip_j else cfg.jacobian
    x_in = x_hat.detach()
    if cfg.residual_cfg:
        eps_hat = unet(bb, x_in, t, null) + cfg.guidance_ref * (unet(bb, x_in, t, ref) - unet(bb, x_in, t, null))
    else:
        eps_hat = unet(bb, x_in, t, ref)
    r = mask * (jacobian * (x_hat - x_hat.detach()) + eps_hat - target)
    loss = r.pow(2).sum() / r.numel()
    x_ms = (bb.scheduler.alphas_cumprod[draw.t_ms].to(eps.dtype).reshape(-1, 1, 1, 1).sqrt() * module.ms_latents
            + (1 - bb.scheduler.alphas_cumprod[draw.t_ms].to(eps.dtype)).reshape(-1, 1, 1, 1).sqrt() * draw.noise_ms)
    loss = loss + ms.lambda_ms * (unet(bb, x_ms, draw.t_ms, ref) - draw.noise_ms).pow(2).mean()
    return list(torch.autograd.grad(loss, module.trainable_parameters(), allow_unused=True))


def module_gradient(module: DreamSteererModule, step: int) -> list[torch.Tensor]:
    for p in module.trainable_parameters():
        p.grad = None
    module.accumulate_gradient(step)
    return [p.grad for p in module.trainable_parameters()]


def max_relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = max(float((x - y).abs().max()) for x, y in zip(a, b) if x is not None and y is not None)
    return num / max(float(y.abs().max()) for y in b if y is not None)


@pytest.mark.parametrize("micro_batch", [0, 1])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_module_gradient_equals_chain_rule_from_raw_unet_calls(tiny_dir, kind, micro_batch):
    check_gradient(personalized(tiny_dir, kind), kind, micro_batch, mistakes=kind == "lora" and micro_batch == 0)


def test_module_gradient_on_sdxl_equals_chain_rule_from_raw_unet_calls(tiny_sdxl_dir):
    check_gradient(personalized(tiny_sdxl_dir, "lora"), "lora", micro_batch=0, mistakes=False)


def check_gradient(bb, kind: str, micro_batch: int, mistakes: bool) -> None:
    module = module_for(bb, kind, micro_batch=micro_batch)
    module.on_fit_start()
    assert module.subject is not None and 0 < float(module.subject.mask.mean()) < 1  # the mask really masks
    ours, reference = module_gradient(module, 3), reference_gradient(module, 3)
    assert [g is None for g in ours] == [g is None for g in reference]
    assert sum(g is not None for g in ours) > 0
    assert max_relative(ours, reference) < 1e-9
    if mistakes:  # the reference is sharp: each wiring mistake moves the gradient
        for mistake in ("swap", "flip_j", "other_eps"):
            assert max_relative(ours, reference_gradient(module, 3, **{mistake: True})) > 1e-3, mistake


def test_residual_with_cfg_is_the_other_choice_and_micro_batches_give_its_gradient(tiny_dir):
    """edsd.residual_cfg=true (the CFG residual, which trains the null branch with weight 1 - w) against the
    chain rule, one row per micro-batch; and it differs from the default plain-eps residual."""
    bb = personalized(tiny_dir, "lora")
    module = module_for(bb, "lora", EDSDConfig(residual_cfg=True), micro_batch=1)
    module.on_fit_start()
    ours = module_gradient(module, 5)
    assert max_relative(ours, reference_gradient(module, 5)) < 1e-9
    module.memory_cfg = MemoryConfig(micro_batch=0)  # the same gradient as the full batch in one graph
    assert max_relative(ours, module_gradient(module, 5)) < 1e-10
    module.edsd_cfg = EDSDConfig(residual_cfg=False)
    assert max_relative(ours, module_gradient(module, 5)) > 1e-3


def test_mask_comes_from_the_pretrained_model(tiny_dir, tiny_backbone):
    bb = personalized(tiny_dir, "lora", torch.float32)
    with torch.no_grad():  # a strong LoRA so that the personalized cross-attention differs visibly
        for p in bb.adapter.trainable_parameters(bb):
            p.mul_(20)
    module = module_for(bb, "lora", lambda_ms=0.0)
    module.on_fit_start()
    args = (module.z_src, SOURCE, "cat", (300,), (2, 4), MASK.threshold, MASK.dilation)
    base = subject_mask(tiny_backbone, *args, seed=module.seed)
    adapted = subject_mask(bb, *args, seed=module.seed, pretrained=False)
    torch.testing.assert_close(module.subject.soft, base.soft, rtol=0, atol=1e-6)
    assert (adapted.soft - base.soft).abs().max() > 1e-3


def test_mode_shifting_images_come_from_the_personalized_model_on_y_ref(tiny_dir):
    bb = personalized(tiny_dir, "lora", torch.float32)
    module = module_for(bb, "lora", sampling_steps=2)
    noise = module._randn((2, 4, 16, 16), 7, 0)
    with torch.no_grad():
        images = module.generate_mode_shift(0)
        ref, null = bb.encode_prompt([module.ref_prompt]), bb.encode_prompt([""])
        expected = ddim_sample(bb, noise, ref, null, 2, 7.5)
        with bb.adapter_disabled():
            pretrained = ddim_sample(bb, noise, ref, null, 2, 7.5)
        on_source = ddim_sample(bb, noise, bb.encode_prompt([SOURCE]), null, 2, 7.5)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert (images - pretrained).abs().max() > 1e-3 and (images - on_source).abs().max() > 1e-3


def test_feature_guidance_source_branch_uses_each_samples_own_starting_noise(tiny_dir, monkeypatch):
    bb = personalized(tiny_dir, "lora", torch.float32)
    module = module_for(bb, "lora", sampling_steps=2, guidance="features")
    seen = {}

    def recording_sample(backbone, noise, cond, uncond, num_steps, scale, guidance, progress=False):
        seen["noise"], seen["guidance"] = noise, guidance
        return noise

    monkeypatch.setattr(dreamsteerer, "ddim_sample", recording_sample)
    module.generate_mode_shift(0)
    noise, guidance = seen["noise"], seen["guidance"]
    assert not torch.equal(noise[0], noise[1])
    t = torch.tensor([700])
    a = bb.scheduler.alphas_cumprod[t].reshape(1, 1, 1, 1)
    torch.testing.assert_close(guidance.source_at(t), a.sqrt() * module.z_src + (1 - a).sqrt() * noise, rtol=0, atol=1e-6)


def test_gradient_checkpointing_recomputes_activations_and_keeps_the_gradient(tiny_dir):
    grads, calls = {}, {}
    for checkpointing in (False, True):
        bb = personalized(tiny_dir, "lora")
        module = module_for(bb, "lora", lambda_ms=0.0, gradient_checkpointing=checkpointing)
        module.on_fit_start()
        count = [0]
        hook = bb.unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(lambda *args: count.__setitem__(0, count[0] + 1))
        grads[checkpointing] = module_gradient(module, 1)
        hook.remove()
        calls[checkpointing] = count[0]
    assert calls[True] > calls[False]  # the block ran again during backward
    assert max_relative(grads[True], grads[False]) < 1e-12


def test_steer_task_with_8bit_adamw_checkpointing_and_micro_batches(tiny_dir, tmp_path):
    """The memory options reach the run from the config: a LoRA export steered with all three moves."""
    from dreamsteer.checkpoints import export_adapter, load_adapter
    from dreamsteer.data.samples import write_sample_images
    from dreamsteer.train.config import compose
    from dreamsteer.train.steer import run

    bb = personalized(tiny_dir, "lora", torch.float32)
    parent = export_adapter(bb, tmp_path / "parent", {"instance_prompt": "a photo of sks cat"})
    write_sample_images(tmp_path / "photos", ["cat"])
    steered = run(compose("steer", [
        f"adapter={parent}", f"image={tmp_path / 'photos' / 'cat.png'}", f"source_prompt='{SOURCE}'",
        f"ref_prompt='{ADAPTERS['lora'][1]}'", f"output_dir={tmp_path / 'run'}", f"model.pretrained={tiny_dir}", "logger=none",
        "steps=2", "mode_shift.n_ms=2", "mode_shift.sampling_steps=2", "mask.timesteps=[300]", "progress=false",
        "optim.name=adamw8bit", "optim.lr.lora=1e-2", "memory.gradient_checkpointing=true", "memory.micro_batch=2",
    ]))
    before, after = load_backbone(str(tiny_dir)), load_backbone(str(tiny_dir))
    load_adapter(before, parent)
    load_adapter(after, steered)
    moved = [not torch.equal(p, q) for (_, p), (_, q) in zip(before.adapter.named_trainable(before), after.adapter.named_trainable(after))]
    assert all(moved)
    config = json.loads((steered / "adapter.json").read_text())["steering"]["config"]
    assert config["optim"]["name"] == "adamw8bit" and config["memory"] == {"gradient_checkpointing": True, "micro_batch": 2}
