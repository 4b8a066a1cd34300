"""`python -m train personalize method=<dreambooth|lora|textual_inversion|custom_diffusion> data.instance_dir=... data.instance_prompt=...`

Trains one personalization method with Lightning on a few photos of a subject and exports the
adapter (diffusers / A1111 formats + adapter.json) to ``<output_dir>/adapter``. Returns that path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dreamsteer.checkpoints.adapter_io import prepare_export_target
from dreamsteer.data.subject import Concept, ConceptConfig, SubjectDataConfig, SubjectDataModule, check_resolution, concept_folders, validate_subject_data
from dreamsteer.lit_modules.optimizers import OPTIMIZERS, missing_optimizer_package
from dreamsteer.train.config import LIGHTNING_LOGGERS, ConfigError, LoggerConfig, ModelConfig, TrainerConfig, check_choice, check_common, output_dir, validate
from dreamsteer.train.lock import is_launch_rank_zero, output_lock
from dreamsteer.train.logs import lightning_logger

METHODS = ("dreambooth", "lora", "textual_inversion", "custom_diffusion")
PIVOT_STAGE = "pivot"  # the pivot stage's run folder, inside the run's
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
    variant: str = "lora"  # lora | dora | loha | lokr
    conv_target_modules: List[str] = field(default_factory=list)  # e.g. [conv1, conv2, conv_shortcut]
    conv_rank: Optional[int] = None  # default: rank
    conv_alpha: Optional[float] = None  # default: conv_rank
    rank_pattern: Optional[Dict[str, int]] = None  # {regex matching the end of a UNet module name: rank}
    alpha_pattern: Optional[Dict[str, float]] = None
    decompose_both: bool = False  # lokr: also factor the first Kronecker factor
    decompose_factor: int = -1  # lokr: the factor size (-1: the most balanced)


@dataclass
class TextualInversionMethod:
    name: str = "textual_inversion"
    lr: float = 5e-4
    tokens: List[str] = field(default_factory=lambda: ["<sks>"])
    initializer_token: str = "*"  # one existing token, or several words: vector i starts from word i mod n
    num_vectors: int = 1


@dataclass
class CustomDiffusionMethod:
    name: str = "custom_diffusion"
    lr: float = 1e-5
    modifier_tokens: List[str] = field(default_factory=lambda: ["<new1>"])
    initializer_token: Any = "*"  # one existing token, or a list of one per modifier token (diffusers' "ktn+pll+ucd")
    train_q_out: bool = False
    detach_sot: bool = True


METHOD_SCHEMAS = {
    "dreambooth": DreamBoothMethod,
    "lora": LoraMethod,
    "textual_inversion": TextualInversionMethod,
    "custom_diffusion": CustomDiffusionMethod,
}


@dataclass
class PivotConfig:
    adapter: Optional[str] = None  # a textual_inversion export whose words this LoRA / DreamBooth trains on, frozen
    max_steps: int = 0  # > 0: train the words first (Textual Inversion with `method`, this run's data) into <output_dir>/pivot
    method: TextualInversionMethod = field(default_factory=TextualInversionMethod)


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
    vae_latent: str = "sample"  # sample | mean: the latent the loss denoises (lit_modules/personalize.py)
    min_timestep: int = 0
    max_timestep: Optional[int] = None  # exclusive; default: the model's num_train_timesteps


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit | lion | lion8bit | adafactor | prodigy (see lit_modules/optimizers.py)
    text_encoder_lr: Optional[float] = None  # lr of trainable text-encoder parameters; default: method.lr
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    scale_lr: bool = False  # lr *= batch_size * accumulate_grad_batches * world_size


@dataclass
class ValidationConfig:
    every_n_steps: int = 0  # 0: off
    save_images: bool = True  # PNG files in <output_dir>/samples/step<N>/
    prompts: List[str] = field(default_factory=list)  # default: the instance prompt
    num_images: int = 2
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass
class CacheConfig:
    latents: bool = True  # VAE posterior of each distinct view (image, crop, flip) computed once
    text_embeddings: bool = True  # each distinct prompt encoded once; only when the text encoder is frozen


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.999
    warmup: bool = True  # d_n = min(decay, (1 + n) / (10 + n))
    export: str = "ema"  # ema | raw: the weights of the export and of validation samples


@dataclass
class CompileConfig:
    unet: bool = False  # torch.compile the UNet's forward (in place: parameter names are unchanged)
    backend: str = "inductor"  # torch.compile backend (inductor | eager | aot_eager | ...)
    mode: Optional[str] = None  # null | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: Optional[str] = None  # default: <output_dir>/adapter


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
    cache: CacheConfig = field(default_factory=CacheConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pivot: PivotConfig = field(default_factory=PivotConfig)
    gradient_checkpointing: bool = False
    seed: int = 0
    ckpt_path: Optional[str] = None  # "last" (this output_dir's checkpoints/last.ckpt) or a path
    output_dir: Optional[str] = None
    progress: bool = True  # false: no progress bar at all (Lightning's, class images, model loading)


# ----------------------------------------------------------------------------- checks
def check_concept_keys(cfg: DictConfig) -> None:
    """``data.concepts`` is a list of mappings of ConceptConfig's keys (the schema merge would not name the entry)."""
    concepts = OmegaConf.select(cfg, "data.concepts")
    if concepts is None:
        return
    known = [f.name for f in fields(ConceptConfig)]
    if not OmegaConf.is_list(concepts):
        raise ConfigError(f"config key 'data.concepts': must be a list of {{{', '.join(known)}}} (or null), got {concepts!r}")
    for k, entry in enumerate(concepts):
        if not OmegaConf.is_dict(entry):
            raise ConfigError(f"config key 'data.concepts[{k}]': must be a mapping of {known}, got {entry!r}")
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise ConfigError(f"config key 'data.concepts[{k}].{unknown[0]}': not a concept key (one of {known})")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Schema + value checks of a composed personalize config (ConfigError names the key)."""
    check_concept_keys(cfg)
    cfg = validate(cfg, PersonalizeConfig)
    check_common(cfg, LIGHTNING_LOGGERS)
    if cfg.method is None or "name" not in cfg.method:
        raise ConfigError(f"config key 'method': choose one with method=<{'|'.join(METHODS)}>")
    check_choice(cfg, "method.name", METHODS)
    cfg.method = validate(cfg.method, METHOD_SCHEMAS[cfg.method.name])
    if cfg.method.name == "lora":
        check_lora_method(cfg.method)
    if cfg.method.name == "lora" and cfg.method.train_text_encoder:
        from dreamsteer.diffusion.adapters import AdapterError, check_text_encoder_lora

        try:
            check_text_encoder_lora()
        except AdapterError as err:
            raise ConfigError(f"config key 'method.train_text_encoder': {err}") from None
    check_pivot(cfg)
    if cfg.method.name == "custom_diffusion" and not isinstance(cfg.method.initializer_token, str):
        inits, tokens = cfg.method.initializer_token, list(cfg.method.modifier_tokens)
        if not OmegaConf.is_list(inits) or len(inits) != len(tokens) or not all(isinstance(t, str) for t in inits):
            raise ConfigError(f"config key 'method.initializer_token': {inits!r} must be one token or a list of one per modifier token {tokens}")
    check_choice(cfg, "optim.name", list(OPTIMIZERS))
    missing = missing_optimizer_package(cfg.optim.name)
    if missing:
        raise ConfigError(f"config key 'optim.name': {missing}")
    if cfg.optim.text_encoder_lr is not None and cfg.optim.text_encoder_lr <= 0:
        raise ConfigError(f"config key 'optim.text_encoder_lr': {cfg.optim.text_encoder_lr} must be > 0 (or null)")
    check_choice(cfg, "optim.scheduler", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
    check_choice(cfg, "trainer.precision", PRECISIONS)
    check_choice(cfg, "ema.export", ["ema", "raw"])
    if cfg.compile.unet:
        import torch._dynamo

        check_choice(cfg, "compile.backend", torch._dynamo.list_backends(exclude_tags=()))
        check_choice(cfg, "compile.mode", [None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"config key 'ema.decay': {cfg.ema.decay} must be in (0, 1)")
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
    check_choice(cfg, "loss.vae_latent", ["sample", "mean"])
    if loss.min_timestep < 0 or (loss.max_timestep is not None and loss.max_timestep <= loss.min_timestep):
        raise ConfigError("config keys 'loss.min_timestep' / 'loss.max_timestep': need 0 <= min < max")
    if cfg.validation.every_n_steps < 0 or cfg.validation.num_images < 1 or cfg.validation.steps < 1:
        raise ConfigError("config keys 'validation.every_n_steps' >= 0, 'validation.num_images' and 'validation.steps' >= 1")
    return cfg


def uses_pivot(cfg: DictConfig) -> bool:
    """Whether this run trains on pivot words (`pivot.adapter` given, or `pivot.max_steps` > 0)."""
    return cfg.pivot.adapter is not None or cfg.pivot.max_steps > 0


def check_pivot(cfg: DictConfig) -> None:
    """The pivot keys that need no file: one source of words, for a method that keeps the vocabulary as it finds it."""
    p = cfg.pivot
    if p.max_steps < 0:
        raise ConfigError(f"config key 'pivot.max_steps': {p.max_steps} must be >= 0 (0: no pivot stage)")
    if p.adapter is not None and p.max_steps > 0:
        raise ConfigError("config keys 'pivot.adapter' / 'pivot.max_steps': give one source of pivot words, an export to load or steps to train them")
    if uses_pivot(cfg) and cfg.method.name not in ("lora", "dreambooth"):
        raise ConfigError(f"config key 'pivot': pivot words are for method=lora or dreambooth (pivotal tuning); {cfg.method.name} trains words itself")
    if p.method.name != "textual_inversion":
        raise ConfigError(f"config key 'pivot.method.name': pivot words are trained by textual_inversion, got {p.method.name!r}")
    if not 0 < p.method.lr <= 1:
        raise ConfigError(f"config key 'pivot.method.lr': {p.method.lr} must lie in (0, 1]")


def pivot_tokens(cfg: DictConfig) -> list[str]:
    """The pivot words every instance prompt must name; `pivot.adapter` is checked here (a readable textual_inversion export)."""
    if cfg.pivot.max_steps > 0:
        return list(cfg.pivot.method.tokens)
    if cfg.pivot.adapter is None:
        return []
    from dreamsteer.checkpoints.adapter_io import AdapterLoadError, check_adapter_folder

    try:
        manifest = check_adapter_folder(Path(cfg.pivot.adapter).expanduser())
    except (OSError, AdapterLoadError) as err:
        raise ConfigError(f"config key 'pivot.adapter': {err}") from None
    if manifest["method"] != "textual_inversion":
        raise ConfigError(f"config key 'pivot.adapter': {cfg.pivot.adapter} is a {manifest['method']} export; pivot words come from a textual_inversion one")
    return list(manifest["tokens"])


def prompt_words(cfg: DictConfig) -> list[str]:
    """The words every instance prompt must name: the method's own tokens (TI, Custom Diffusion), then its pivot words."""
    return required_tokens(cfg) + pivot_tokens(cfg)


def pivot_stage_config(cfg: DictConfig, out: Path) -> DictConfig:
    """The run that trains the pivot words: Textual Inversion with `pivot.method` for `pivot.max_steps` on this run's data and
    loss, in ``<out>/pivot`` (resumed, or reused once done); no prior preservation (the prior guards the UNet's fine-tune)
    and no separate text-encoder lr (the words are all it trains)."""
    stage = OmegaConf.to_container(cfg, resolve=True)
    stage["method"] = dict(stage["pivot"]["method"])
    stage["trainer"]["max_steps"] = stage["pivot"]["max_steps"]
    stage["pivot"] = OmegaConf.to_container(OmegaConf.structured(PivotConfig))
    stage["loss"]["prior_preservation"] = False
    stage["optim"]["text_encoder_lr"] = None
    stage.update(output_dir=str(out / PIVOT_STAGE), ckpt_path="last", export={"enabled": True, "dir": None})
    return OmegaConf.create(stage)


def pivot_folder(pivot: Any, out: Path) -> Path | None:
    """Where a run's pivot words are (`pivot`: its config's ``pivot``; None for a run from before pivots existed):
    `pivot.adapter`, its pivot stage's export ``<out>/pivot/adapter``, or None without pivot words."""
    if pivot is None:
        return None
    if pivot.get("adapter") is not None:
        return Path(pivot["adapter"]).expanduser()
    return out / PIVOT_STAGE / "adapter" if pivot.get("max_steps", 0) > 0 else None


def load_base(model: Any, pivot: Any, out: Path) -> Any:
    """A run's base model on the CPU (the Trainer moves it to each rank's device) with its pivot words (`pivot_folder`)."""
    from dreamsteer.checkpoints.adapter_io import load_pivot
    from dreamsteer.diffusion.backbone import load_backbone

    backbone = load_backbone(model["pretrained"], model["dtype"], "cpu", model.get("cache_dir"), model.get("single_file_config"))
    folder = pivot_folder(pivot, out)
    if folder is not None:
        load_pivot(backbone, folder)
    return backbone


def check_lora_method(m: DictConfig) -> None:
    """The LoRA keys that need no model: variant, ranks, patterns, variant-only options, and that some tool
    Layer names are checked when the adapter is attached, still before training."""
    import re

    from dreamsteer.diffusion.adapters import LORA_VARIANTS, unloadable_lora

    if m.variant not in LORA_VARIANTS:
        raise ConfigError(f"config key 'method.variant': {m.variant!r} is not one of {list(LORA_VARIANTS)}")
    if m.rank < 1 or (m.conv_rank is not None and m.conv_rank < 1):
        raise ConfigError(f"config keys 'method.rank' / 'method.conv_rank': {m.rank} / {m.conv_rank} must be >= 1")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (m[key] or {}).items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"config key 'method.{key}': {pattern!r} is not a regular expression ({err})") from None
            if key == "rank_pattern" and value < 1:
                raise ConfigError(f"config key 'method.rank_pattern': rank {value} for {pattern!r} must be >= 1")
    if m.variant in ("loha", "lokr") and m.dropout:
        raise ConfigError(f"config key 'method.dropout': {m.dropout} with variant {m.variant!r}: peft's LoHa / LoKr layers have no input dropout; use 0")
    if m.variant != "lokr" and (m.decompose_both or m.decompose_factor != -1):
        raise ConfigError(f"config keys 'method.decompose_both' / 'method.decompose_factor': LoKr options, but method.variant is {m.variant!r}")
    unloadable = unloadable_lora(m.variant, m.train_text_encoder)
    if unloadable:
        raise ConfigError(f"config keys 'method.variant' / 'method.train_text_encoder': {unloadable}")
    if m.decompose_factor != -1 and m.decompose_factor < 1:
        raise ConfigError(f"config key 'method.decompose_factor': {m.decompose_factor} must be -1 (balanced) or >= 1")


def required_tokens(cfg: DictConfig) -> list[str]:
    if cfg.method.name == "textual_inversion":
        return list(cfg.method.tokens)
    if cfg.method.name == "custom_diffusion":
        return list(cfg.method.modifier_tokens)
    return []


# Keys a resumed run must keep (they shape the trainable state, the optimizer state or the data);
# every other change is applied from the resume step with a warning and recorded in adapter.json.
FIXED_ON_RESUME = ("method.", "pivot.", "model.pretrained", "model.single_file_config", "data.resolution", "optim.name", "optim.scheduler",
                   "optim.text_encoder_lr", "ema.enabled", "data.buckets", "data.bucket_step")
CHANGEABLE_ON_RESUME = ("method.lr",)
# Where the run happens, not what it learns.
NOT_RECORDED_ON_RESUME = ("ckpt_path", "output_dir", "export.", "logger.", "validation.", "cache.", "compile.", "trainer.accelerator", "trainer.devices",
                          "trainer.num_nodes", "trainer.strategy", "trainer.log_every_n_steps", "model.cache_dir", "model.device",
                          "data.num_workers")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def schema_defaults(method: str) -> dict[str, Any]:
    """Every config key's default for a run of `method` (flattened): what a checkpoint written before the key existed
    ran with, since new keys default to the earlier behaviour."""
    tree = OmegaConf.to_container(OmegaConf.structured(PersonalizeConfig))
    tree["method"] = OmegaConf.to_container(OmegaConf.structured(METHOD_SCHEMAS[method]))
    return _flatten(tree)


def resume_changes(old: dict[str, Any], new: dict[str, Any], where: Path, defaults: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """The config keys that differ between a checkpoint's run and this one, ``{key: [old, new]}``; a key the
    checkpoint's config lacks counts as its value in `defaults` (`schema_defaults`).
    ConfigError (one line, naming the key and both values) for a change that cannot work."""
    before, after = _flatten(old), _flatten(new)
    before = {**{k: v for k, v in (defaults or {}).items() if k in after}, **before}
    changed = {}
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key.startswith(NOT_RECORDED_ON_RESUME):
            continue
        if key.startswith(FIXED_ON_RESUME) and key not in CHANGEABLE_ON_RESUME:
            raise ConfigError(f"config key '{key}': the checkpoint {where} was trained with {before.get(key)!r}, this run asks for "
                              f"{after.get(key)!r}; a resumed run must keep it (use a new output_dir to train with the new value)")
        changed[key] = [before.get(key), after.get(key)]
    return changed


def resume_point(cfg: DictConfig, out: Path, owner: bool) -> tuple[str | None, list[dict[str, Any]]]:
    """The checkpoint to resume from (``ckpt_path=last``: the newest readable one of ``<out>/checkpoints``)
    and the run's resume history with this resume appended. `owner`: this process may clean the folder."""
    from dreamsteer.checkpoints.lightning import CheckpointError, find_resume_checkpoint, load_checkpoint, resolve_checkpoint

    if cfg.ckpt_path is None:
        return None, []
    if cfg.ckpt_path == "last":
        found = find_resume_checkpoint(out / "checkpoints", clean=owner)
        if found is None:
            print(f"ckpt_path=last: no checkpoint in {out / 'checkpoints'} yet, starting from scratch")
            return None, []
        path, checkpoint = found
    else:
        path = resolve_checkpoint(Path(cfg.ckpt_path).expanduser())  # a file, or a run folder's last.ckpt
        checkpoint = load_checkpoint(path)
    old = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(old, dict):
        raise CheckpointError(f"checkpoint {path}: not written by `python -m train personalize` (no config)")
    step = int(checkpoint.get("global_step", 0))
    changed = resume_changes(old, OmegaConf.to_container(cfg, resolve=True), path, schema_defaults(cfg.method.name))
    if changed and owner:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        print(f"warning: resuming {path} (step {step}) with a changed config: {listed}; applied from step {step}, recorded in adapter.json")
    return str(path), [*checkpoint.get("resumes", []), {"step": step, "checkpoint": path.name, "changed": changed}]


def build_trainer(cfg: DictConfig, out: Path, callbacks: Sequence[Any] = ()):
    import lightning as L

    from dreamsteer.checkpoints.lightning import AtomicFileCheckpointIO, step_checkpoints
    from dreamsteer.train.progress import StepProgressBar

    t = cfg.trainer
    checkpoint = step_checkpoints(out / "checkpoints", t.checkpoint_every_n_steps or t.max_steps, t.keep_all_checkpoints)
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
        callbacks=[*callbacks, checkpoint, *([StepProgressBar()] if cfg.progress else [])],
        plugins=[AtomicFileCheckpointIO()],  # no in-memory copy of the checkpoint while saving
        default_root_dir=str(out),
        use_distributed_sampler=False,  # the DataModule shards its endless stream by rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
    )


# ----------------------------------------------------------------------------- task
def run(cfg: DictConfig, callbacks: Sequence[Any] = ()) -> Path:
    """Validate everything, train, export on rank 0; return the export folder. `callbacks` are extra Lightning callbacks
    of the adapter's fit (not of a pivot stage before it)."""
    from dreamsteer.diffusion.backbone import set_progress_bars

    cfg = validate_config(cfg)
    set_progress_bars(cfg.progress)
    concepts = validate_subject_data(cfg.data, prompt_words(cfg), cfg.loss.prior_preservation)  # before loading a model
    if cfg.ckpt_path not in (None, "last"):  # a given checkpoint is checked before anything is written
        from dreamsteer.checkpoints.lightning import check_checkpoint_file, resolve_checkpoint

        check_checkpoint_file(resolve_checkpoint(Path(cfg.ckpt_path).expanduser()))
    out = output_dir(cfg)
    export_dir = Path(cfg.export.dir).expanduser() if cfg.export.dir else out / "adapter"
    owner = is_launch_rank_zero()  # the other DDP ranks re-run this function and must not lock or clean
    with contextlib.ExitStack() as locks:
        if owner:
            locks.enter_context(output_lock(out, "personalize"))
        if owner and cfg.export.enabled:
            prepare_export_target(export_dir, {"the run folder": out, "its checkpoints": out / "checkpoints", **concept_folders(concepts)})
            if export_dir.parent.resolve() != out.resolve():
                locks.enter_context(output_lock(export_dir.parent, "personalize (export)"))
        return _run(cfg, concepts, out, export_dir, owner, callbacks)


def run_folders(cfg: DictConfig, concepts: Sequence[Concept], out: Path, name: str) -> list[Path]:
    """Per concept, its folder `name` under the run folder: ``<out>/<name>`` for the single data.instance_dir
    form (as before concepts existed), ``<out>/<name>/concept<k>`` with data.concepts."""
    if cfg.data.concepts is None:
        return [out / name]
    return [out / name / f"concept{k}" for k in range(len(concepts))]


def _run(cfg: DictConfig, concepts: list[Concept], out: Path, export_dir: Path, owner: bool, callbacks: Sequence[Any]) -> Path:
    from dreamsteer.checkpoints.adapter_io import export_is_stale
    from dreamsteer.checkpoints.lightning import read_trimmed_checkpoint
    from dreamsteer.lit_modules.personalize import MODULES
    from dreamsteer.train.export import export_checkpoint

    prior = cfg.loss.prior_preservation
    concepts = [replace(c, class_dir=c.class_dir or str(default)) for c, default in zip(concepts, run_folders(cfg, concepts, out, "class_images"))]
    ckpt_path, resumes = resume_point(cfg, out, owner)

    if cfg.pivot.max_steps > 0:  # before this run's model is loaded: the stage loads its own; `callbacks` are this fit's
        print(f"pivot: training the words {list(cfg.pivot.method.tokens)} first ({cfg.pivot.max_steps} steps of Textual Inversion)")
        run(pivot_stage_config(cfg, out))
    # the words before attention masks and the adapter: both see the prompts' words
    backbone = load_base(cfg.model, cfg.pivot, out)
    resolution = check_resolution(cfg.data, backbone.vae_scale_factor, backbone.resolution)
    if cfg.data.masks == "attention":  # with the base model, before the adapter is attached
        from dreamsteer.lit_modules.subject_masks import write_attention_masks

        d = cfg.data
        concepts = [
            replace(c, items=write_attention_masks(backbone, c.items, c.instance_prompt, c.mask_token, folder, resolution, d.mask_threshold, d.mask_dilation, cfg.seed))
            for c, folder in zip(concepts, run_folders(cfg, concepts, out, "masks"))
        ]

    module = MODULES[cfg.method.name](
        OmegaConf.to_container(cfg, resolve=True), backbone, str(export_dir) if cfg.export.enabled else None, samples_dir=str(out / "samples"),
    )
    module.resumes = resumes
    datamodule = SubjectDataModule(cfg.data, concepts, resolution, seed=cfg.seed, prior_preservation=prior, progress=cfg.progress,
                                   vae_scale_factor=backbone.vae_scale_factor)
    trainer = build_trainer(cfg, out, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    last = out / "checkpoints" / "last.ckpt"
    if cfg.export.enabled and trainer.is_global_zero and export_is_stale(export_dir, last):
        # a resume at max_steps skips the loop (and its export): export what the last checkpoint holds
        path = export_checkpoint(module, read_trimmed_checkpoint(last), export_dir)
        print(f"exported {cfg.method.name} adapter from {last} to {path} (the adapter was missing or older than the checkpoint)")
    return export_dir
