"""`python -m train personalize method=<dreambooth|lora|textual_inversion|custom_diffusion> data.instance_dir=... data.instance_prompt=...`

Trains one personalization method with Lightning on a few photos of a subject and exports the
adapter (diffusers / A1111 formats + adapter.json) to ``<output_dir>/adapter``. Returns that path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dreamsteer.data.subject import SubjectDataConfig, SubjectDataModule, check_resolution, validate_subject_data
from dreamsteer.train.config import ConfigError, LoggerConfig, ModelConfig, TrainerConfig, check_choice, check_common, output_dir, validate
from dreamsteer.train.logs import lightning_logger

METHODS = ("dreambooth", "lora", "textual_inversion", "custom_diffusion")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


# ----------------------------------------------------------------------------- schemas
@dataclass
class DreamBoothMethod:
    name: str = "dreambooth"
    lr: float = 5e-6
    train_text_encoder: bool = False


@dataclass
class LoraMethod:
    name: str = "lora"
    lr: float = 1e-4
    rank: int = 4
    alpha: Optional[float] = None  # default: rank (scale 1)
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass
class TextualInversionMethod:
    name: str = "textual_inversion"
    lr: float = 5e-4
    tokens: List[str] = field(default_factory=lambda: ["<sks>"])
    initializer_token: str = "*"
    num_vectors: int = 1


@dataclass
class CustomDiffusionMethod:
    name: str = "custom_diffusion"
    lr: float = 1e-5
    modifier_tokens: List[str] = field(default_factory=lambda: ["<new1>"])
    initializer_token: str = "*"
    train_q_out: bool = False
    detach_sot: bool = True


METHOD_SCHEMAS = {
    "dreambooth": DreamBoothMethod,
    "lora": LoraMethod,
    "textual_inversion": TextualInversionMethod,
    "custom_diffusion": CustomDiffusionMethod,
}


@dataclass
class PersonalizeTrainerConfig(TrainerConfig):
    max_steps: int = 400
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0  # 0: one checkpoint at the end
    keep_all_checkpoints: bool = False


@dataclass
class LossConfig:
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    min_timestep: int = 0
    max_timestep: Optional[int] = None  # exclusive; default: the model's num_train_timesteps


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    scale_lr: bool = False  # lr *= batch_size * accumulate_grad_batches * world_size


@dataclass
class ValidationConfig:
    every_n_steps: int = 0  # 0: off
    prompts: List[str] = field(default_factory=list)  # default: the instance prompt
    num_images: int = 2
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: Optional[str] = None  # default: <output_dir>/adapter
    a1111: bool = False  # also the kohya LoRA file / A1111 embedding files


@dataclass
class PersonalizeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None
    data: SubjectDataConfig = field(default_factory=SubjectDataConfig)
    trainer: PersonalizeTrainerConfig = field(default_factory=PersonalizeTrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gradient_checkpointing: bool = False
    seed: int = 0
    ckpt_path: Optional[str] = None  # "last" (this output_dir's checkpoints/last.ckpt) or a path
    output_dir: Optional[str] = None


# ----------------------------------------------------------------------------- checks
def validate_config(cfg: DictConfig) -> DictConfig:
    """Schema + value checks of a composed personalize config (ConfigError names the key)."""
    cfg = validate(cfg, PersonalizeConfig)
    check_common(cfg)
    if cfg.method is None or "name" not in cfg.method:
        raise ConfigError(f"config key 'method': choose one with method=<{'|'.join(METHODS)}>")
    check_choice(cfg, "method.name", METHODS)
    cfg.method = validate(cfg.method, METHOD_SCHEMAS[cfg.method.name])
    check_choice(cfg, "optim.name", ["adamw", "adamw8bit"])
    check_choice(cfg, "optim.scheduler", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
    check_choice(cfg, "trainer.precision", PRECISIONS)
    if cfg.model.dtype != "fp32" and not cfg.trainer.precision.endswith("-mixed"):
        raise ConfigError(
            f"config key 'trainer.precision': {cfg.trainer.precision!r} with model.dtype={cfg.model.dtype}: half-precision frozen weights "
            "need mixed precision (bf16-mixed or 16-mixed) so the fp32 trainable weights can meet them"
        )
    t = cfg.trainer
    if t.max_steps < 1 or t.accumulate_grad_batches < 1 or t.checkpoint_every_n_steps < 0 or t.log_every_n_steps < 1:
        raise ConfigError("config keys 'trainer.max_steps', 'trainer.accumulate_grad_batches', 'trainer.log_every_n_steps' must be >= 1 and 'trainer.checkpoint_every_n_steps' >= 0")
    if not 0 < cfg.method.lr <= 1:
        raise ConfigError(f"config key 'method.lr': {cfg.method.lr} must lie in (0, 1]")
    loss = cfg.loss
    if loss.snr_gamma is not None and loss.snr_gamma <= 0:
        raise ConfigError(f"config key 'loss.snr_gamma': {loss.snr_gamma} must be > 0 (or null)")
    if loss.min_timestep < 0 or (loss.max_timestep is not None and loss.max_timestep <= loss.min_timestep):
        raise ConfigError("config keys 'loss.min_timestep' / 'loss.max_timestep': need 0 <= min < max")
    if cfg.validation.every_n_steps < 0 or cfg.validation.num_images < 1 or cfg.validation.steps < 1:
        raise ConfigError("config keys 'validation.every_n_steps' >= 0, 'validation.num_images' and 'validation.steps' >= 1")
    return cfg


def required_tokens(cfg: DictConfig) -> list[str]:
    if cfg.method.name == "textual_inversion":
        return list(cfg.method.tokens)
    if cfg.method.name == "custom_diffusion":
        return list(cfg.method.modifier_tokens)
    return []


def resolve_ckpt_path(ckpt_path: str | None, out: Path) -> str | None:
    """``last`` -> ``<out>/checkpoints/last.ckpt`` (None, with a note, when there is none yet)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        print(f"ckpt_path=last: no checkpoint in {last.parent} yet, starting from scratch")
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"config key 'ckpt_path': checkpoint {path} not found")
    return str(path)


def build_trainer(cfg: DictConfig, out: Path, callbacks: Sequence[Any] = ()):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dreamsteer.checkpoints.lightning import AtomicFileCheckpointIO

    t = cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=str(out / "checkpoints"),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps or t.max_steps,
        save_top_k=-1 if t.keep_all_checkpoints else 1,
        save_last=True,
    )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        logger=lightning_logger(cfg, out),
        callbacks=[*callbacks, checkpoint],
        plugins=[AtomicFileCheckpointIO()],  # no in-memory copy of the checkpoint while saving
        default_root_dir=str(out),
        use_distributed_sampler=False,  # the DataModule shards its endless stream by rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


# ----------------------------------------------------------------------------- task
def run(cfg: DictConfig, callbacks: Sequence[Any] = ()) -> Path:
    """Validate everything, train, export on rank 0; return the export folder. `callbacks` are extra Lightning callbacks."""
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.lit_modules.personalize import MODULES

    cfg = validate_config(cfg)
    tokens = required_tokens(cfg)
    prior = cfg.loss.prior_preservation
    items = validate_subject_data(cfg.data, tokens, prior)  # everything that needs no model, before loading one
    out = output_dir(cfg)

    m = cfg.model
    # loaded on the CPU: the Trainer (trainer.accelerator / devices) moves it to each rank's device
    backbone = load_backbone(m.pretrained, m.dtype, "cpu", m.cache_dir, m.single_file_config)
    resolution = check_resolution(cfg.data, backbone.vae_scale_factor, backbone.resolution)

    export_dir = Path(cfg.export.dir) if cfg.export.dir else out / "adapter"
    module = MODULES[cfg.method.name](OmegaConf.to_container(cfg, resolve=True), backbone, str(export_dir) if cfg.export.enabled else None)
    class_dir = Path(cfg.data.class_dir) if cfg.data.class_dir else out / "class_images"
    datamodule = SubjectDataModule(cfg.data, items, resolution, seed=cfg.seed, prior_preservation=prior, class_dir=class_dir)
    trainer = build_trainer(cfg, out, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, out))
    return export_dir

