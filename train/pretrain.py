"""`python -m train pretrain stage=<vae|unet|gligen> ...`: train the toy model from scratch.

A model is made by several runs of this task, each from the export of the one before, e.g.

    python -m train pretrain stage=vae output_dir=runs/vae
    python -m train pretrain stage=unet vae=runs/vae/model/vae output_dir=runs/unet
    python -m train pretrain stage=gligen init=runs/unet/model output_dir=runs/gligen

and ``recipe=<toy|toy_gligen|file.yaml> output_dir=...`` runs a recorded list of them (the shipped models' own:
``conf/recipes/``, docs/toy.md; `train/pretrain_recipe.py`).

``stage=unet init=<model>`` continues training a text-to-image model (its UNet and text encoder, from
the weights it exported, with a new optimizer) instead of building one from scratch.

Each writes its result as a diffusers folder ``<output_dir>/model`` (``vae/`` alone for stage=vae; a
whole pipeline otherwise), rewritten atomically every ``trainer.export_every_n_steps`` steps and at
the end, so a run stopped early still leaves usable weights. Data: the scene renderer
(``data.source=scenes``, `data.scenes`) or a folder of images with caption .txt files
(``data.source=folder data.folder=...``). Lightning checkpoints under ``<output_dir>/checkpoints``
resume a run (``ckpt_path=last``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from dreamsteer.train.config import ConfigError, LoggerConfig, TrainerConfig, check_choice, check_common, output_dir, validate
from dreamsteer.train.logs import lightning_logger
from dreamsteer.train.progress import StepProgressBar

STAGES = ("vae", "unet", "gligen")


@dataclass
class ArchConfig:
    """Sizes of the toy model (`diffusion.toy.ToyArchitecture`)."""

    resolution: int = 32
    vae_channels: List[int] = field(default_factory=lambda: [32, 64])
    unet_channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    plain_blocks: int = 1  # leading UNet blocks without cross-attention (0: attention at every size)
    layers_per_block: int = 1
    attention_heads: int = 2  # heads per UNet attention layer (the shipped models': 32 channels wide)
    text_width: int = 128
    text_layers: int = 2
    max_tokens: int = 24


@dataclass
class PretrainDataConfig:
    source: str = "scenes"  # scenes | folder
    folder: Optional[str] = None  # source=folder: images with <image>.txt captions
    min_objects: int = 1
    max_objects: int = 2
    two_tone_p: float = 0.0  # stage vae/unet: probability of a two-tone object ("a red circle with a yellow center"; unet: never the subject)
    two_tone_leave_out: str = "subject_colors"  # stage unet: never the subject's pair of colors on any shape (subject_colors), on its shape (subject), or its shape two-tone (subject_shape)
    position_words_p: float = 0.0  # stage unet/gligen: probability that a caption names each object's place (data/scenes.py)
    fixed_pattern: float = 0.0  # amplitude (8-bit levels) of a faint texture the same in every image: a position prior (data/scenes.py)
    fixed_pattern_cell: int = 2  # its cell in pixels: 2 = one latent pixel of the toy VAE, 4 = one token of the 8x8 attention
    batch_size: int = 32
    num_workers: int = 1


@dataclass
class PretrainTrainerConfig(TrainerConfig):
    max_steps: int = 4000
    max_time: Optional[str] = None  # "DD:HH:MM:SS": stop (and export) at this wall time, whichever of the two comes first
    log_every_n_steps: int = 25
    checkpoint_every_n_steps: int = 500
    export_every_n_steps: int = 500  # rewrite <output_dir>/model every N steps (0: only at the end)
    gradient_clip_val: Optional[float] = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 200
    schedule: str = "constant"  # constant | cosine (after the warm-up, to 0 at trainer.max_steps)
    caption_dropout: float = 0.1  # stage unet/gligen: the caption (and grounding) is dropped for CFG
    ema_decay: float = 0.999  # stage unet/gligen
    noise_offset: float = 0.0  # stage unet/gligen: offset noise (lit_modules/pretrain.py), e.g. 0.1
    timesteps: str = "uniform"  # stage unet/gligen: uniform | cubic (most draws at high noise; lit_modules/pretrain.py)
    min_timestep: int = 0  # stage unet/gligen: draw t in [min_timestep, max_timestep)
    max_timestep: Optional[int] = None  # exclusive; null: the scheduler's num_train_timesteps
    loss_weighting: str = "eps"  # stage unet/gligen: eps | x0 | v (weight on high noise; lit_modules/pretrain.py)
    freeze_unet: bool = True  # stage gligen: only GLIGEN's new layers train (GLIGEN); false trains the whole UNet too
    grounding_dropout: Optional[float] = None  # stage gligen: drop the boxes on their own (null: with the caption)
    ungrounded_p: float = 0.0  # stage gligen, freeze_unet=false: train this share of the items with GLIGEN's layers off
    phrase_dropout: float = 0.0  # stage gligen: drop each object's phrase and box on its own, the caption still naming it
    gate_init: Optional[float] = None  # stage gligen: start every gate alpha_attn here (null: 0 for new layers, kept for a GLIGEN init)
    train_text_encoder: bool = True  # stage unet; stage gligen with freeze_unet=false
    kl_weight: float = 1e-6  # stage vae
    train_vae_encoder: bool = True  # stage vae: false fine-tunes the decoder of `vae` only (latents unchanged)
    flat_latent_weight: float = 0.0  # stage vae: weight of the flat-background term (lit_modules/pretrain.py)


@dataclass
class SamplesConfig:
    every_n_steps: int = 0  # 0: off; N: sample images every N steps and at the end (train/pretrain_samples.py)
    count: int = 16  # held-out scenes (data.source=folder: the folder's first images)
    steps: int = 25  # stage unet: DDIM steps
    guidance: float = 7.5  # stage unet: classifier-free guidance (the floors')
    seed: int = 0  # stage unet: sample i from a generator seeded seed + i


@dataclass
class PretrainConfig:
    stage: str = "unet"
    vae: Optional[str] = None  # stage unet: the trained VAE folder (a stage=vae run's model/vae); stage vae: start from it; with init: replaces its VAE
    init: Optional[str] = None  # stage gligen: the model to add GLIGEN layers to (null + vae: from scratch); stage unet: the model to continue
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    trainer: PretrainTrainerConfig = field(default_factory=PretrainTrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    threads: int = 1  # torch CPU threads (on a busy CPU, one thread is much faster than two)
    seed: int = 0
    ckpt_path: Optional[str] = None  # last | path to a Lightning checkpoint
    output_dir: Optional[str] = None
    recipe: Optional[str] = None  # toy | toy_gligen | a recipe .yaml: run its phases in output_dir instead (train/pretrain_recipe.py)
    recipe_until: Optional[str] = None  # with recipe: stop after this phase


def validate_config(cfg: DictConfig, check_folders: bool = True) -> DictConfig:
    """Schema and value checks (ConfigError names the key), before any model is built. `check_folders=False`
    skips the existence of `vae`, `init` and `data.folder` (a recipe's later phases read what earlier ones write)."""
    cfg = validate(cfg, PretrainConfig)
    check_common(cfg)
    check_choice(cfg, "stage", STAGES)
    check_choice(cfg, "data.source", ["scenes", "folder"])
    check_choice(cfg, "optim.timesteps", ["uniform", "cubic"])
    check_choice(cfg, "optim.loss_weighting", ["eps", "x0", "v"])
    check_choice(cfg, "optim.schedule", ["constant", "cosine"])
    a, d, t, o = cfg.arch, cfg.data, cfg.trainer, cfg.optim
    factor = 2 ** (len(a.vae_channels) - 1)
    if a.resolution % (factor * 2 ** (len(a.unet_channels) - 1)):
        raise ConfigError(f"config key 'arch.resolution': {a.resolution} must be divisible by the VAE factor times the UNet's downsampling")
    if any(c % 16 for c in [*a.vae_channels, *a.unet_channels]):
        raise ConfigError("config keys 'arch.vae_channels' / 'arch.unet_channels': every width must be a multiple of 16 (group norm)")
    if a.attention_heads < 1 or any(c % a.attention_heads for c in a.unet_channels):
        raise ConfigError(f"config key 'arch.attention_heads': {a.attention_heads} must be >= 1 and divide every width of "
                          f"arch.unet_channels {list(a.unet_channels)}")
    if d.source == "folder" and not d.folder:
        raise ConfigError("config key 'data.folder': required with data.source=folder")
    if d.source == "folder" and cfg.stage == "gligen":
        raise ConfigError("config key 'data.source': stage=gligen needs boxes, which only data.source=scenes provides")
    if not 1 <= d.min_objects <= d.max_objects <= 3:
        raise ConfigError("config keys 'data.min_objects' / 'data.max_objects': need 1 <= min <= max <= 3")
    if not 0 <= d.two_tone_p <= 1 or (d.two_tone_p and cfg.stage == "gligen"):
        raise ConfigError(f"config key 'data.two_tone_p': {d.two_tone_p} must be in [0, 1], and 0 for stage=gligen "
                          "(its phrases and boxes are of one-color objects)")
    from dreamsteer.data.scenes import FIXED_PATTERN_MAX, TWO_TONE_LEAVE_OUT

    if d.two_tone_leave_out not in TWO_TONE_LEAVE_OUT or d.two_tone_leave_out == "nothing":
        raise ConfigError(f"config key 'data.two_tone_leave_out': {d.two_tone_leave_out!r} must be subject_colors (the subject's pair "
                          "of colors on no shape), subject (not on its shape) or subject_shape (its shape never two-tone); the diffusion model never sees the subject itself")
    if not 0 <= d.position_words_p <= 1 or (d.position_words_p and cfg.stage == "vae"):
        raise ConfigError(f"config key 'data.position_words_p': {d.position_words_p} must be in [0, 1], and 0 for stage=vae (no captions)")
    if not 0 <= d.fixed_pattern <= FIXED_PATTERN_MAX:
        raise ConfigError(f"config key 'data.fixed_pattern': {d.fixed_pattern} must be in [0, {FIXED_PATTERN_MAX}] (8-bit levels; "
                          "a stronger pattern would change what the detector reads)")
    if d.fixed_pattern_cell < 1 or a.resolution % d.fixed_pattern_cell:
        raise ConfigError(f"config key 'data.fixed_pattern_cell': {d.fixed_pattern_cell} must be >= 1 and divide arch.resolution {a.resolution}")
    if d.fixed_pattern and d.source != "scenes":
        raise ConfigError("config key 'data.fixed_pattern': only data.source=scenes draws the pattern")
    if d.batch_size < 1 or t.max_steps < 1 or t.export_every_n_steps < 0 or t.checkpoint_every_n_steps < 0:
        raise ConfigError("config keys 'data.batch_size', 'trainer.max_steps' must be >= 1, 'trainer.*_every_n_steps' >= 0")
    if t.max_time is not None and not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", str(t.max_time)):
        raise ConfigError(f"config key 'trainer.max_time': {t.max_time!r} is not DD:HH:MM:SS (e.g. 00:08:00:00 for eight hours)")
    if o.lr <= 0 or not 0 <= o.caption_dropout < 1 or not 0 <= o.ema_decay < 1:
        raise ConfigError("config keys 'optim.lr' > 0, 'optim.caption_dropout' and 'optim.ema_decay' in [0, 1)")
    if o.grounding_dropout is not None and not 0 <= o.grounding_dropout < 1:
        raise ConfigError(f"config key 'optim.grounding_dropout': {o.grounding_dropout} is not in [0, 1)")
    if o.ungrounded_p and (cfg.stage != "gligen" or o.freeze_unet or not 0 < o.ungrounded_p < 1):
        raise ConfigError(f"config key 'optim.ungrounded_p': {o.ungrounded_p} needs stage=gligen, optim.freeze_unet=false "
                          "(with GLIGEN's layers off only the UNet can learn) and a value in [0, 1)")
    if o.phrase_dropout and (cfg.stage != "gligen" or not 0 < o.phrase_dropout < 1):
        raise ConfigError(f"config key 'optim.phrase_dropout': {o.phrase_dropout} needs stage=gligen and a value in [0, 1)")
    one_device = str(t.devices) == "1" or (str(t.devices) == "auto" and t.accelerator == "cpu")  # Lightning's auto on a CPU: one
    several = t.strategy.startswith("ddp") or t.num_nodes > 1 or not one_device
    if o.ungrounded_p and several and "find_unused_parameters_true" not in t.strategy:
        raise ConfigError(f"config key 'trainer.strategy': {t.strategy} with optim.ungrounded_p on several processes: a process whose "
                          "items all run without GLIGEN's layers gives them no gradient, which plain DDP refuses; "
                          "use trainer.strategy=ddp_find_unused_parameters_true")
    if o.gate_init is not None and (cfg.stage != "gligen" or not -3 <= o.gate_init <= 3):
        raise ConfigError(f"config key 'optim.gate_init': {o.gate_init} needs stage=gligen and a value in [-3, 3] "
                          "(the gate is tanh(alpha_attn); 0.5 opens it to 0.46)")
    from dreamsteer.diffusion.toy import toy_scheduler

    T = toy_scheduler().config.num_train_timesteps
    if not 0 <= o.min_timestep < (T if o.max_timestep is None else o.max_timestep) <= T:
        raise ConfigError(f"config keys 'optim.min_timestep' / 'optim.max_timestep': {o.min_timestep} / {o.max_timestep}, "
                          f"need 0 <= min < max <= {T} (the training schedule's timesteps)")
    if not 0 <= o.noise_offset <= 1:
        raise ConfigError(f"config key 'optim.noise_offset': {o.noise_offset} is not in [0, 1] (0.05-0.1 is usual)")
    if o.flat_latent_weight < 0 or (o.flat_latent_weight and (cfg.stage != "vae" or not o.train_vae_encoder)):
        raise ConfigError(f"config key 'optim.flat_latent_weight': {o.flat_latent_weight} must be >= 0, and 0 unless stage=vae "
                          "trains the encoder (the term shapes the encoder's latents)")
    if cfg.stage == "vae" and not o.train_vae_encoder and not cfg.vae:
        raise ConfigError("config key 'vae': optim.train_vae_encoder=false fine-tunes the decoder of a trained VAE; give its folder")
    if cfg.stage == "unet" and not (cfg.vae or cfg.init):
        raise ConfigError("config key 'vae': stage=unet needs the trained VAE folder (e.g. a stage=vae run's <output_dir>/model/vae), "
                          "or `init`: a text-to-image model to continue")
    if cfg.stage == "vae" and cfg.init:
        raise ConfigError("config key 'init': stage=vae starts from a VAE folder given as `vae`, not `init`")
    if cfg.stage == "gligen" and not (cfg.init or cfg.vae):
        raise ConfigError("config key 'init': stage=gligen needs the text-to-image model to extend (e.g. toy), "
                          "or `vae` (and no init) to train a GLIGEN model from scratch")
    if cfg.stage == "gligen" and not cfg.init and o.freeze_unet:
        raise ConfigError("config key 'optim.freeze_unet': a GLIGEN model trained from scratch (no `init`) trains its whole UNet; set it false")
    if not 0 <= a.plain_blocks < len(a.unet_channels):
        raise ConfigError(f"config key 'arch.plain_blocks': {a.plain_blocks} must be in [0, {len(a.unet_channels) - 1}] (the last block has cross-attention)")
    sm = cfg.samples
    if sm.every_n_steps < 0 or not 1 <= sm.count <= 64 or sm.steps < 1 or sm.guidance < 0:
        raise ConfigError(f"config keys 'samples.*': every_n_steps {sm.every_n_steps} must be >= 0, count {sm.count} in [1, 64], "
                          f"steps {sm.steps} >= 1 and guidance {sm.guidance} >= 0")
    if sm.every_n_steps and cfg.stage == "gligen":
        raise ConfigError("config key 'samples.every_n_steps': stage=gligen draws no samples (they would need each scene's phrases "
                          "and boxes); measure a GLIGEN model with python -m dreamsteer.benchmarks.toy_floors --part gligen")
    if not check_folders:
        return cfg
    for key in ("vae", "init"):
        path = cfg[key]
        if path is not None and path != "toy" and not Path(path).is_dir():
            raise ConfigError(f"config key '{key}': folder {path} not found")
    if d.source == "folder" and not Path(d.folder).is_dir():
        raise ConfigError(f"config key 'data.folder': folder {d.folder} not found")
    return cfg


def architecture(cfg: DictConfig):
    from dreamsteer.diffusion.toy import ToyArchitecture

    a = cfg.arch
    return ToyArchitecture(
        resolution=a.resolution,
        vae_channels=tuple(a.vae_channels),
        unet_channels=tuple(a.unet_channels),
        plain_blocks=a.plain_blocks,
        layers_per_block=a.layers_per_block,
        attention_heads=a.attention_heads,
        text_width=a.text_width,
        text_layers=a.text_layers,
        max_tokens=a.max_tokens,
    )


def dataset(cfg: DictConfig, resolution: int, processes: int = 1, done_steps: int = 0):
    """The training images: a batch of random scenes for each of `processes` (DDP splits a dataset between them) at
    each step from `done_steps` (a resumed run's) to `cfg.trainer.max_steps`, each scene new; or the caption folder."""
    from dreamsteer.data.captioned import CaptionedFolder
    from dreamsteer.data.scenes import SceneDataset

    d = cfg.data
    if d.source == "folder":
        return CaptionedFolder(d.folder, resolution)
    # The VAE sees every pair of colors (it must reconstruct the subject); the diffusion model never
    # the subject, so that it stays new to it.
    per_step = d.batch_size * processes
    steps = max(cfg.trainer.max_steps - done_steps, 1)  # a finished run resumed: one batch, which it does not train on
    return SceneDataset(steps * per_step, cfg.seed, resolution, d.min_objects, d.max_objects, d.two_tone_p,
                        d.position_words_p, d.fixed_pattern, d.fixed_pattern_cell,
                        leave_out="nothing" if cfg.stage == "vae" else d.two_tone_leave_out, first=done_steps * per_step)


def load_vae(folder: str, resolution: int):
    from diffusers import AutoencoderKL

    from dreamsteer.diffusion.backbone import dtype_kwargs

    vae = AutoencoderKL.from_pretrained(folder, **dtype_kwargs(torch.float32), local_files_only=True)
    if vae.config.sample_size != resolution:
        raise ConfigError(f"config key 'vae': the VAE in {folder} was trained at {vae.config.sample_size} px, arch.resolution is {resolution}")
    return vae


def check_caption_length(cfg: DictConfig, tokenizer) -> None:
    """Raise if the scenes' longest caption is more tokens than the tokenizer keeps: the tail cut off
    would be the background, trained on as if the caption never named it."""
    from dreamsteer.data.scenes import longest_caption

    d = cfg.data
    caption = longest_caption(d.max_objects, two_tone=d.two_tone_p > 0, positions=d.position_words_p > 0)
    n = len(tokenizer(caption).input_ids)
    if n > tokenizer.model_max_length:
        where = f"the tokenizer of `init` ({cfg.init})" if cfg.init else "arch.max_tokens"
        raise ConfigError(f"config keys 'data.max_objects' / 'data.two_tone_p' / 'data.position_words_p': the longest caption "
                          f"they allow is {n} tokens ({caption!r}), more than the {tokenizer.model_max_length} of {where}; "
                          "allow fewer objects, or train from scratch with a larger arch.max_tokens")


def build_modules(cfg: DictConfig):
    """The LightningModule for the stage (its `export()` gives the VAE or pipeline to save)."""
    from dreamsteer.data.scenes import GRAMMAR_WORDS, POSITION_WORDS, SUBJECT
    from dreamsteer.diffusion import toy
    from dreamsteer.lit_modules.pretrain import DiffusionPretrainModule, VaePretrainModule

    arch, o = architecture(cfg), cfg.optim
    decay_steps = cfg.trainer.max_steps if o.schedule == "cosine" else 0
    if cfg.stage == "vae":
        vae = load_vae(cfg.vae, arch.resolution) if cfg.vae else toy.build_vae(arch, cfg.seed)
        return VaePretrainModule(vae, o.lr, o.kl_weight, o.warmup_steps, train_encoder=o.train_vae_encoder, decay_steps=decay_steps,
                                 flat_weight=o.flat_latent_weight)
    from_scratch = not cfg.init
    if from_scratch:
        vae = load_vae(cfg.vae, arch.resolution)
        position_words = POSITION_WORDS if cfg.data.position_words_p else ()  # the shipped vocabulary unless positions are named
        tokenizer = toy.toy_tokenizer([*GRAMMAR_WORDS, *position_words, SUBJECT.token], arch.max_tokens)
        text_encoder = toy.build_text_encoder(arch, tokenizer, cfg.seed + 1)
        latent = arch.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        unet = toy.build_unet(arch, latent, arch.text_width, cfg.seed + 2)
    else:
        from dreamsteer.diffusion.backbone import load_backbone

        base = load_backbone(cfg.init)
        if base.resolution != arch.resolution:
            raise ConfigError(f"config key 'arch.resolution': {arch.resolution}, but the model in `init` ({cfg.init}) "
                              f"works at {base.resolution} px; the scenes are rendered at arch.resolution")
        text_encoder, tokenizer, unet = base.text_encoder, base.tokenizer, base.unet
        # another VAE (e.g. a re-trained encoder) under the model's UNet: the UNet trains on its latents from here
        vae = load_vae(cfg.vae, arch.resolution) if cfg.vae else base.vae
        if cfg.data.position_words_p:
            split = toy.words_not_single_tokens(tokenizer, POSITION_WORDS)
            if split:
                raise ConfigError(f"config key 'data.position_words_p': the tokenizer of `init` ({cfg.init}) has no token for "
                                  f"{split}; position words need a model trained from scratch with them")
    if cfg.data.source == "scenes":
        check_caption_length(cfg, tokenizer)
    if cfg.stage == "gligen":
        from dreamsteer.diffusion.gligen import add_gated_layers, set_gates

        unet = add_gated_layers(unet, cfg.seed + 3)
        if o.gate_init is not None:
            set_gates(unet, o.gate_init)
    module = DiffusionPretrainModule(
        vae, text_encoder, tokenizer, unet, toy.toy_scheduler(), o.lr, o.warmup_steps, o.caption_dropout, o.ema_decay,
        o.train_text_encoder and (cfg.stage == "unet" or not o.freeze_unet),
        grounded=cfg.stage == "gligen", noise_offset=o.noise_offset, timesteps=o.timesteps,
        loss_weighting=o.loss_weighting, freeze_unet=o.freeze_unet, grounding_dropout=o.grounding_dropout,
        decay_steps=decay_steps, min_timestep=o.min_timestep, max_timestep=o.max_timestep, ungrounded_p=o.ungrounded_p,
        phrase_dropout=o.phrase_dropout,
    )
    return module


class ExportCallback(Callback):
    """Writes the stage's result to ``<output_dir>/model`` every N steps and at the end (rank 0):
    a VAE to ``model/vae``, a pipeline as the whole folder, both atomically."""

    def __init__(self, target: Path, every: int, scale_images: torch.Tensor | None):
        self.target, self.every, self.scale_images = target, every, scale_images

    def write(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from dreamsteer.diffusion.toy import save_pretrained_atomic

        if trainer.global_rank != 0:
            return
        if self.scale_images is not None:
            module.set_scaling_factor(self.scale_images)
        result = module.export()
        save_pretrained_atomic(result, self.target if hasattr(result, "components") else self.target / "vae")
        module.train()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.write(trainer, module)


def sample_callback(cfg: DictConfig, folder: Path) -> Callback:
    """The `samples` callback: held-out toy-world scenes (the VAE's with the run's two-tone objects), or the
    caption folder's first images."""
    from dreamsteer.train.pretrain_samples import SampleCallback, folder_items, held_out_scenes

    sm, resolution = cfg.samples, cfg.arch.resolution
    scenes = cfg.data.source == "scenes"
    if scenes:
        truths, captions = held_out_scenes(sm.count, resolution, cfg.data.two_tone_p if cfg.stage == "vae" else 0.0)
    else:
        truths, captions = folder_items(cfg.data.folder, sm.count, resolution)
    return SampleCallback(folder, sm.every_n_steps, truths, captions, scenes, sm.steps, sm.guidance, sm.seed)


def checkpoint_step(path: str | None) -> int:
    """The global step a Lightning checkpoint was saved at (0 for None)."""
    if path is None:
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resume_checkpoint(ckpt_path: str | None, out: Path) -> str | None:
    """``last`` -> ``<out>/checkpoints/last.ckpt`` (None when there is none yet); a path must exist."""
    if ckpt_path is None:
        return None
    path = out / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if path.is_file():
        return str(path)
    if ckpt_path == "last":
        print(f"ckpt_path=last: no checkpoint in {path.parent} yet, starting from scratch")
        return None
    raise FileNotFoundError(f"config key 'ckpt_path': checkpoint {path} not found")


def run(cfg: DictConfig) -> Path:
    """Validate, train the stage, export; returns ``<output_dir>/model``. With ``recipe``: run the recipe's phases."""
    if cfg.get("recipe"):
        from dreamsteer.train.pretrain_recipe import run_recipe

        return run_recipe(cfg)
    from torch.utils.data import DataLoader

    from dreamsteer.checkpoints.lightning import AtomicFileCheckpointIO, step_checkpoints
    from dreamsteer.data.scenes import collate_scenes, random_scene
    from dreamsteer.data.images import pil_to_tensor

    cfg = validate_config(cfg)
    out = output_dir(cfg)
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_modules(cfg)
    # the VAE's scaling factor is measured on held-out scenes (seeds past the training ones)
    scale_images = None
    if cfg.stage == "vae" and cfg.optim.train_vae_encoder:  # a decoder fine-tune keeps the latents' scale
        scale_images = torch.stack([pil_to_tensor(random_scene((cfg.seed + 1, i), resolution=cfg.arch.resolution).image) for i in range(256)])
    model_dir = out / "model"
    t = cfg.trainer
    callbacks = [
        ExportCallback(model_dir, t.export_every_n_steps, scale_images),
        step_checkpoints(out / "checkpoints", t.checkpoint_every_n_steps or t.max_steps),
        StepProgressBar(),
    ]
    if cfg.samples.every_n_steps:
        callbacks.append(sample_callback(cfg, out / "samples"))
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_time=t.max_time,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        logger=lightning_logger(cfg, out),
        callbacks=callbacks,
        plugins=[AtomicFileCheckpointIO()],
        default_root_dir=str(out),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    resume = resume_checkpoint(cfg.ckpt_path, out)
    # a resumed run goes on with the scenes after those it trained on (Lightning would restart the dataset)
    loader = DataLoader(
        dataset(cfg, cfg.arch.resolution, trainer.world_size, checkpoint_step(resume)),
        batch_size=cfg.data.batch_size,
        shuffle=cfg.data.source == "folder",  # random scenes are already in random order
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.data.num_workers,
        collate_fn=collate_scenes,
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    return model_dir
