"""`python -m train steer`: DreamSteerer on an exported adapter and one source photo; exports the steered adapter.

    python -m train steer adapter=<export dir> image=<photo> \
        source_prompt="a photo of a cat next to a mirror" ref_prompt="a photo of a sks cat next to a mirror"

Every input is checked before any compute: the adapter dir and its adapter.json, the base model
(the adapter must have been trained on `model.pretrained`), the concept token in `ref_prompt`, the
class token in `source_prompt`, and the photo. The steered adapter is written in the baseline's own
format to ``<output_dir>/<export_name>`` with a ``steering`` record in its adapter.json; the subject
mask and the mode-shifting images go beside it (``mask.png``, ``mode_shift_guided.png``, ...) and to
TensorBoard.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from dreamsteer.checkpoints import AdapterLoadError, export_adapter, load_adapter
from dreamsteer.checkpoints.adapter_io import check_adapter_folder, prepare_export_target, sha256_file, write_json_atomic
from dreamsteer.data.images import load_image, pil_to_tensor, resize_and_crop, save_image_atomic, tensor_to_pil
from dreamsteer.distill.prompts import subject_words
from dreamsteer.lit_modules.dreamsteerer import (
    GLIGEN_BOX,
    DreamSteererModule,
    EDSDConfig,
    MaskConfig,
    MemoryConfig,
    ModeShiftConfig,
    OptimConfig,
    check_model,
    check_settings,
    subject_phrase,
)
from dreamsteer.train.config import ConfigError, LoggerConfig, ModelConfig, TrainerConfig, check_common, output_dir, resolve_device, validate
from dreamsteer.train.lock import output_lock
from dreamsteer.train.logs import lightning_logger

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


@dataclass
class SteerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    adapter: Optional[str] = None
    image: Optional[str] = None
    source_prompt: Optional[str] = None
    ref_prompt: Optional[str] = None
    class_token: Optional[str] = None
    concept_token: Optional[str] = None
    steps: int = 10
    seed: int = 0
    export_name: str = "adapter"
    progress: bool = True
    output_dir: Optional[str] = None
    edsd: EDSDConfig = field(default_factory=EDSDConfig)
    mode_shift: ModeShiftConfig = field(default_factory=ModeShiftConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# ----------------------------------------------------------------------------- input checks
def _words(text: str) -> list[str]:
    return text.split()


def contains_word(text: str, word: str) -> bool:
    """`word` occurs in `text` delimited by whitespace or punctuation (not inside another word)."""
    return re.search(rf"(?<![\w<>-]){re.escape(word)}(?![\w<>-])", text) is not None


def concept_tokens(manifest: dict[str, Any], override: str | None, adapter_dir: Path, source_prompt: str, ref_prompt: str) -> list[str]:
    """The adapter's concept identifier(s), in this order: `override`; adapter.json `tokens` (TI
    placeholders, Custom Diffusion modifiers); the words of the instance prompt that the class prompt
    lacks ("a photo of sks cat" vs "a photo of a cat" -> sks); the words of the instance prompt that
    `ref_prompt` adds to `source_prompt` (LoRA / DreamBooth trained without a class prompt)."""
    if override:
        return [override]
    tokens = [t for t in manifest.get("tokens") or [] if t]
    if tokens:
        return tokens
    instance, klass = manifest.get("instance_prompt") or "", manifest.get("class_prompt") or ""
    if instance and klass:
        extra = [w for w in _words(instance) if w not in set(_words(klass))]
        if extra:
            return extra
    if instance:
        added = set(_words(ref_prompt)) - set(_words(source_prompt))
        found = [w for w in _words(instance) if w in added]
        if found:
            return found
        hint = [w for w in _words(instance) if w not in set(_words(source_prompt))]
        raise ValueError(
            f"ref_prompt {ref_prompt!r} does not contain the concept token of adapter {adapter_dir} (a word of its instance "
            f"prompt {instance!r} that the source prompt lacks{', e.g. ' + repr(hint[0]) if hint else ''}); "
            "or set concept_token=<identifier>"
        )
    raise ValueError(
        f"adapter {adapter_dir}: cannot tell its concept token (adapter.json has no tokens and no instance prompt); "
        "set concept_token=<identifier, e.g. sks>"
    )


def infer_class_token(source_prompt: str, ref_prompt: str) -> str:
    """The words of `source_prompt` that `ref_prompt` personalizes: `distill.prompts.subject_words`, the
    words DDS-SM's mask reads when editing ("a photo of a cat" / "a photo of a <cat-toy>" -> cat; "a photo
    of a cat" / "a photo of a sks cat" -> cat; "a yellow circle" / "a sks circle" -> yellow circle)."""
    found = subject_words(source_prompt, ref_prompt)
    if not found:
        raise ValueError(
            f"cannot tell the class token from source_prompt={source_prompt!r} and ref_prompt={ref_prompt!r}; "
            "set class_token=<the subject word of the source prompt>"
        )
    return found


def trained_learning_rate(manifest: dict[str, Any]) -> float | None:
    """The learning rate an adapter was trained with, as `personalize` records it in adapter.json
    (`training.method.lr`); None for adapters that record none (converted from other tools)."""
    training = manifest.get("training")
    method = training.get("method") if isinstance(training, dict) else None
    lr = method.get("lr") if isinstance(method, dict) else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 else None


@dataclass
class SteerInputs:
    adapter_dir: Path
    manifest: dict[str, Any]
    image_path: Path
    image: Any  # PIL
    tokens: list[str]
    class_token: str
    lr: float  # the steering learning rate: the adapter's own (optim.lr_from_adapter) or optim.lr.<kind>
    lr_source: str  # "adapter" | "config"


def check_inputs(cfg: DictConfig) -> SteerInputs:
    """Every user input, checked before any model is loaded (errors name the key or file)."""
    for key in ("adapter", "image", "source_prompt", "ref_prompt"):
        if not cfg.get(key):
            raise ConfigError(f"config key '{key}': required (python -m train steer {key}=...)")
    if cfg.steps < 1:
        raise ConfigError(f"config key 'steps': must be >= 1, got {cfg.steps}")
    if cfg.export_name in ("", ".", "..") or any(sep in cfg.export_name for sep in ("/", "\\", os.sep)):
        raise ConfigError(f"config key 'export_name': {cfg.export_name!r} must be a plain folder name (no path separators, not '..'); "
                          "the export goes to <output_dir>/<export_name>")
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(f"config key 'trainer.precision': {cfg.trainer.precision!r} is not one of {list(PRECISIONS)}")
    if cfg.model.dtype != "fp32" and not cfg.trainer.precision.endswith("-mixed"):
        raise ConfigError(f"config key 'trainer.precision': {cfg.trainer.precision!r} with model.dtype={cfg.model.dtype}: "
                          "half-precision frozen weights need bf16-mixed or 16-mixed")
    check_settings(cfg.edsd, cfg.mode_shift, cfg.mask, memory=cfg.memory, optim=cfg.optim)
    adapter_dir = Path(cfg.adapter).expanduser()
    manifest = check_adapter_folder(adapter_dir)
    kind = manifest["method"]
    trained_lr = trained_learning_rate(manifest) if cfg.optim.lr_from_adapter else None
    if trained_lr is None and kind not in cfg.optim.lr:
        raise ConfigError(f"config key 'optim.lr.{kind}': no learning rate for the adapter's method {kind!r}")
    lr, lr_source = (trained_lr, "adapter") if trained_lr is not None else (float(cfg.optim.lr[kind]), "config")
    tokens = concept_tokens(manifest, cfg.concept_token, adapter_dir, cfg.source_prompt, cfg.ref_prompt)
    if not any(contains_word(cfg.ref_prompt, tok) for tok in tokens):
        raise ValueError(f"ref_prompt {cfg.ref_prompt!r} does not contain the concept token of adapter {adapter_dir} "
                         f"(one of {tokens}); write it as e.g. {cfg.source_prompt!r} with the subject named by {tokens[0]!r}")
    class_token = cfg.class_token or infer_class_token(cfg.source_prompt, cfg.ref_prompt)
    if not contains_word(cfg.source_prompt, class_token):
        raise ValueError(f"class token {class_token!r} is not a word of source_prompt {cfg.source_prompt!r} (config key 'class_token')")
    if cfg.mode_shift.guidance == GLIGEN_BOX and not cfg.mode_shift.phrase:
        subject_phrase(cfg.source_prompt, cfg.ref_prompt, class_token)  # the grounded phrase must be derivable
    image_path = Path(cfg.image).expanduser()
    image = load_image(image_path)  # ImageLoadError (a ValueError) names the file
    return SteerInputs(adapter_dir, manifest, image_path, image, tokens, class_token, lr, lr_source)


# ----------------------------------------------------------------------------- run
@dataclass
class Prepared:
    """A checked config with the loaded backbone (adapter attached) and the source latent."""

    cfg: DictConfig
    inputs: SteerInputs
    backbone: Any
    z_src: torch.Tensor
    out: Path
    load_time: float


def prepare(cfg: DictConfig) -> Prepared:
    """Check every input, then load the base model, attach the adapter and encode the source photo."""
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.distill.subject_mask import token_positions

    started = time.perf_counter()
    cfg = validate(cfg, SteerConfig)
    check_common(cfg)
    inputs = check_inputs(cfg)
    out = output_dir(cfg)
    prepare_export_target(out / cfg.export_name, {"the input adapter": inputs.adapter_dir, "the source photo": inputs.image_path})

    device = resolve_device(cfg.model.device)
    backbone = load_backbone(cfg.model.pretrained, cfg.model.dtype, device, cfg.model.cache_dir, cfg.model.single_file_config)
    check_model(backbone, cfg.mode_shift)  # gligen_box needs a GLIGEN base model
    try:
        load_adapter(backbone, inputs.adapter_dir)
    except AdapterLoadError as err:  # e.g. trained on another base model: say which key fixes it
        raise AdapterLoadError(f"{err}. For steering, set model.pretrained to the adapter's base model "
                               f"(adapter.json base_model: {inputs.manifest.get('base_model')!r})") from err
    token_positions(backbone.tokenizer, cfg.source_prompt, inputs.class_token)  # the word must survive tokenization
    with torch.no_grad():
        pixels = pil_to_tensor(resize_and_crop(inputs.image, backbone.resolution))[None]
        z_src = backbone.encode_image(pixels.to(backbone.device, backbone.dtype))
    return Prepared(cfg, inputs, backbone, z_src, out, time.perf_counter() - started)


def _optim_config(cfg: DictConfig, inputs: SteerInputs) -> OptimConfig:
    """`optim` with the adapter's method at the resolved steering rate (`SteerInputs.lr`)."""
    optim = OmegaConf.to_container(cfg.optim)
    return OptimConfig(**{**optim, "lr": {**optim["lr"], inputs.manifest["method"]: inputs.lr}})


def steer(prepared: Prepared) -> tuple[Path, dict[str, float]]:
    """Fit the DreamSteerer module and export the steered adapter; returns (export dir, timings)."""
    import lightning as L

    from dreamsteer.train.progress import StepProgressBar

    cfg, inputs, backbone, out = prepared.cfg, prepared.inputs, prepared.backbone, prepared.out
    module = DreamSteererModule(
        backbone, prepared.z_src, cfg.source_prompt, cfg.ref_prompt, inputs.class_token,
        EDSDConfig(**OmegaConf.to_container(cfg.edsd)), ModeShiftConfig(**OmegaConf.to_container(cfg.mode_shift)),
        MaskConfig(**OmegaConf.to_container(cfg.mask)), _optim_config(cfg, inputs),
        seed=cfg.seed, progress=cfg.progress, memory=MemoryConfig(**OmegaConf.to_container(cfg.memory)),
    )
    on_gpu = backbone.device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=[backbone.device.index or 0] if on_gpu else 1,  # steering one photo is a single-device job
        precision=cfg.trainer.precision,
        max_steps=cfg.steps,
        max_epochs=1,
        logger=lightning_logger(cfg, out),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
        callbacks=[StepProgressBar()] if cfg.progress else [],
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    fit_start = time.perf_counter()
    with warnings.catch_warnings():  # the frozen modules are in eval mode on purpose (DreamSteererModule.train)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.arange(cfg.steps), batch_size=1))
    fit_time = time.perf_counter() - fit_start

    export_start = time.perf_counter()
    backbone.adapter.set_trainable(backbone, False)
    steering = {
        "source_image": str(inputs.image_path),
        "source_image_sha256": sha256_file(inputs.image_path),
        "source_prompt": cfg.source_prompt,
        "ref_prompt": cfg.ref_prompt,
        "class_token": inputs.class_token,
        "concept_tokens": inputs.tokens,
        "parent_adapter": str(inputs.adapter_dir),
        "parent_files": inputs.manifest.get("files", {}),
        "steps": int(module.global_step),
        "lr": inputs.lr,
        "lr_source": inputs.lr_source,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if module.subject is not None:
        steering["mask_fraction"] = float(module.subject.mask.mean())
    if module.ms_box is not None:  # gligen_box: what grounded the mode-shifting images
        steering["mode_shift_grounding"] = {"phrase": module.phrase, "box": module.ms_box}
    # the personalization's record travels with the weights it made, so a steered adapter can be steered again at its rate
    carried = {k: inputs.manifest[k] for k in ("instance_prompt", "class_prompt", "training_steps", "training") if k in inputs.manifest}
    path = export_adapter(backbone, out / cfg.export_name, extra={**carried, "steering": steering})
    timings = dict(module.timings)
    timings["export"] = time.perf_counter() - export_start
    timings["load"] = prepared.load_time
    timings["fit_overhead"] = max(0.0, fit_time - sum(module.timings.values()))
    _write_side_outputs(module, backbone, out)
    write_json_atomic({"export": str(path), "timings": timings, "steering": steering}, out / "steer_summary.json")
    print(f"steered {inputs.manifest['method']} adapter written to {path}")
    return Path(path), timings


def run(cfg: DictConfig) -> Path:
    """Steer the adapter in `cfg.adapter` toward `cfg.image`; returns the steered export dir."""
    from dreamsteer.diffusion.backbone import set_progress_bars

    cfg = validate(cfg, SteerConfig)
    set_progress_bars(cfg.progress)
    with output_lock(output_dir(cfg), "steer"):
        path, _ = steer(prepare(cfg))
    return path


def _write_side_outputs(module: DreamSteererModule, backbone: Any, out: Path) -> None:
    """mask.png (binary | soft, upsampled from the latent) and the mode-shifting images as PNG strips."""
    import torch.nn.functional as F

    size = backbone.resolution
    if module.subject is not None:
        maps = torch.cat([module.subject.mask, module.subject.soft], dim=-1).float().cpu()
        maps = F.interpolate(maps, size=(size, 2 * size), mode="nearest")[0]
        save_image_atomic(tensor_to_pil(maps.expand(3, -1, -1) * 2 - 1), out / "mask.png")
    for name, latents in (("mode_shift_guided.png", module.ms_latents), ("mode_shift_unguided.png", module.ms_unguided)):
        if latents is not None:
            with torch.no_grad():
                images = backbone.decode(latents).float().cpu()
            save_image_atomic(tensor_to_pil(torch.cat(list(images), dim=-1)), out / name)
