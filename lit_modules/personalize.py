"""Personalization as LightningModules: DreamBooth, LoRA, Textual Inversion and Custom Diffusion.

All four share one denoising objective (`PersonalizeModule`) and differ only in the adapter they
attach (``diffusion.adapters``), i.e. in which parameters train.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dreamsteer.checkpoints import export_adapter, kohya
from dreamsteer.data.files import write_json_atomic
from dreamsteer.data.images import save_image_atomic
from dreamsteer.data.subject import mix_seed, read_instance_items, resolve_concepts
from dreamsteer.diffusion.adapters import attach_adapter
from dreamsteer.diffusion.backbone import Backbone, load_backbone
from dreamsteer.lit_modules.ema import ParameterEMA
from dreamsteer.lit_modules.optimizers import make_optimizer

# Frozen modules stay in eval mode on purpose (see PersonalizeModule.train); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

MAX_CACHED_PROMPTS = 1024  # shuffled captions make many distinct prompts; past this, new ones are encoded each time


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon, ``/ (SNR + 1)`` for v."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


class PersonalizeModule(L.LightningModule):
    """Shared base of the personalization methods.

    Per micro-batch (instance images ``x``, prompts ``c``; with prior preservation the class
    images and prompt are appended to the same UNet batch)::

        z = vae(x) (posterior sample, or its mean with loss.vae_latent=mean),  eps ~ N(0, I) (+ offset * N(0, I) per channel),  t ~ U{t_min..t_max}
        z_t = sqrt(a_t) z + sqrt(1 - a_t) eps
        target = eps (epsilon model) or v = sqrt(a_t) eps - sqrt(1 - a_t) z (v-prediction model)
        l_i = w(t_i) * mean((f(z_t, t, c) - target)^2)    w = 1, or min-SNR-gamma
        L = mean_instance(l) + prior_loss_weight * mean_class(l)

    On SDXL ``c`` is the family's conditioning (both text encoders and the pooled embedding, see
    `diffusion.family`) and ``f`` also gets the added condition ``time_ids = original_size +
    crop_top_left + target_size`` of each example's view (as diffusers' ``train_dreambooth_lora_sdxl.py``).

    Every random draw of a micro-batch comes from a seed of ``(seed, example index)``, so a resumed
    run repeats an uninterrupted one exactly. Only the adapter's parameters train (kept in fp32
    whatever the model dtype), and checkpoints hold only them.
    """

    method = ""

    def __init__(
        self, config: dict[str, Any], backbone: Backbone | None = None, export_dir: str | None = None, samples_dir: str | None = None,
    ):
        super().__init__()
        config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg = OmegaConf.create(config)
        self.strict_loading = False  # checkpoints hold the trainable state only
        self.export_dir = export_dir
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        m = self.cfg.model
        if backbone is None:
            backbone = load_backbone(m.pretrained, m.dtype, "cpu", m.cache_dir, m.single_file_config)
        self.backbone = backbone
        torch.manual_seed(int(self.cfg.seed))  # adapter initialisation (LoRA A) depends on the seed only
        attach_adapter(backbone, self.method, **self.adapter_kwargs(self.cfg.method))
        self._trains_text_encoder = any(n.startswith("text_encoder") for n, _ in backbone.adapter.named_trainable(backbone))
        for p in backbone.adapter.trainable_parameters(backbone):
            p.data = p.data.float()  # fp32 master weights: no "unscale FP16 gradients", stable updates
        # registered so Lightning moves them and DDP sees the trainable parameters
        self.unet, self.text_encoder, self.vae = backbone.unet, backbone.text_encoder, backbone.vae
        if backbone.text_encoder_2 is not None:
            self.text_encoder_2 = backbone.text_encoder_2
        if self.cfg.gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
            for encoder in backbone.text_encoders() if self.trains_text_encoder else []:
                encoder.gradient_checkpointing_enable()
        self._last_validation_step = -1
        # [{"step", "checkpoint", "changed": {key: [old, new]}}] per resume; kept in checkpoints, written to adapter.json
        self.resumes: list[dict[str, Any]] = []
        self.last_validation: list[tuple[str, Any]] = []  # (prompt, image) of the newest validation, for the model card
        # Caches of what frozen modules compute from the data; they only save time (see cached_latents).
        self.caches_latents = bool(self.cfg.cache.latents)
        self.caches_text = bool(self.cfg.cache.text_embeddings) and not self.trains_text_encoder
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        e = self.cfg.ema
        self.ema = ParameterEMA(backbone.adapter.named_trainable(backbone), e.decay, e.warmup) if e.enabled else None

    # ------------------------------------------------------------------ method hooks
    # Subclasses set `method` and define the static `adapter_kwargs(method_cfg) -> dict`: the arguments of
    # the method's `diffusion.adapters.add_*` function.

    @property
    def required_tokens(self) -> list[str]:
        """Tokens every instance prompt must contain (TI placeholders, Custom Diffusion modifiers)."""
        return []

    @property
    def trains_text_encoder(self) -> bool:
        """Whether any trainable parameter lives in a text encoder (TI/CD rows, LoRA-TE, DreamBooth-TE)."""
        return self._trains_text_encoder

    # ------------------------------------------------------------------ state
    def train(self, mode: bool = True) -> "PersonalizeModule":
        """Only modules that carry trainable parameters go to train mode (frozen ones stay in eval)."""
        super().train(False)
        if mode:
            self.backbone.unet.train()
            for encoder in self.backbone.text_encoders() if self.trains_text_encoder else []:
                encoder.train()
        self.training = mode
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters by module path (views, no copies: a DreamBooth UNet is large)."""
        return {name: p.detach() for name, p in self.backbone.adapter.named_trainable(self.backbone)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()  # frozen weights never enter a checkpoint
        checkpoint["adapter"] = {"method": self.method, "config": self.backbone.adapter.config}
        checkpoint["resumes"] = self.resumes
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {name for name, _ in self.backbone.adapter.named_trainable(self.backbone)}
        got = set(checkpoint["state_dict"])
        if got != expected:
            raise ValueError(
                f"checkpoint does not hold this {self.method} adapter's trainable state "
                f"(missing {sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]}); was it written with the same config?"
            )
        self.restore_ema(checkpoint, "checkpoint")

    def restore_ema(self, checkpoint: dict[str, Any], where: str) -> None:
        """Load the checkpoint's EMA state when this run keeps one (error when the checkpoint has none)."""
        if self.ema is None:
            return
        if "ema" not in checkpoint:
            raise ValueError(f"{where}: holds no EMA state (written with ema.enabled=false); resume with ema.enabled=false")
        self.ema.load_state_dict(checkpoint["ema"], where)

    def exported_weights(self) -> contextlib.AbstractContextManager:
        """A context in which the trainable parameters hold what `ema.export` selects (EMA or raw)."""
        if self.ema is not None and self.cfg.ema.export == "ema":
            return self.ema.swapped_in(self.backbone.adapter.named_trainable(self.backbone))
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of the class docstring on one micro-batch; returns (loss, parts to log)."""
        backbone, loss_cfg = self.backbone, self.cfg.loss
        pixels, prompts = batch["pixel_values"], list(batch["prompt"])
        n_instance = pixels.shape[0]
        if "class_pixel_values" in batch:
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            prompts += list(batch["class_prompt"])
        device = self.device
        sample = loss_cfg.vae_latent == "sample"
        with torch.no_grad():
            if self.caches_latents and "latent_key" in batch:
                keys = list(batch["latent_key"]) + list(batch.get("class_latent_key", []))
                z = self.cached_latents(keys, pixels, sample=sample)
            else:
                z = backbone.encode_image(pixels.to(device), sample=sample).float()
        eps = torch.randn(z.shape, device=device)
        if loss_cfg.noise_offset:
            eps = eps + loss_cfg.noise_offset * torch.randn(z.shape[0], z.shape[1], 1, 1, device=device)
        t_max = loss_cfg.max_timestep if loss_cfg.max_timestep is not None else backbone.num_train_timesteps
        t = torch.randint(int(loss_cfg.min_timestep), int(t_max), (z.shape[0],), device=device)
        z_t = backbone.add_noise(z, eps, t)
        if self.caches_text:
            with torch.no_grad():
                emb = self.cached_text_embeddings(prompts)
        else:
            grad_text = torch.enable_grad() if self.trains_text_encoder else torch.no_grad()
            with grad_text:
                emb = backbone.encode_prompt(prompts)
        hidden, added = backbone.family.unet_inputs(emb.to(backbone.unet.dtype), z_t, self.time_ids(batch, z))
        pred = backbone.unet(z_t.to(backbone.unet.dtype), t, encoder_hidden_states=hidden, **added).sample.float()
        if backbone.prediction_type == "v_prediction":
            a = backbone.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            target = a.sqrt() * eps - (1 - a).sqrt() * z
        else:
            target = eps
        per_example = self.masked_mean((pred - target).square(), batch.get("loss_mask"), n_instance)
        if loss_cfg.snr_gamma is not None:
            per_example = per_example * snr_weights(backbone.alphas_cumprod, t, float(loss_cfg.snr_gamma), backbone.prediction_type)
        instance = per_example[:n_instance].mean()
        parts = {"loss/instance": instance.detach()}
        loss = instance
        if per_example.shape[0] > n_instance:
            prior = per_example[n_instance:].mean()
            loss = loss + loss_cfg.prior_loss_weight * prior
            parts["loss/prior"] = prior.detach()
        return loss, parts

    def time_ids(self, batch: dict[str, Any], z: torch.Tensor) -> torch.Tensor | None:
        """SDXL's ``[B, 6]`` ``original_size + crop_top_left + target_size`` of each view (instance, then class
        examples); target size: the view's pixel size. None for a family without added conditions."""
        family = self.backbone.family
        if family.name != "sdxl":
            return None
        sizes = [batch["original_size"]] + ([batch["class_original_size"]] if "class_original_size" in batch else [])
        crops = [batch["crop_top_left"]] + ([batch["class_crop_top_left"]] if "class_crop_top_left" in batch else [])
        target = (z.shape[-2] * self.backbone.vae_scale_factor, z.shape[-1] * self.backbone.vae_scale_factor)
        return torch.stack([family.time_ids(size.tolist(), crop.tolist(), target)
                            for size, crop in zip(torch.cat(sizes), torch.cat(crops))]).to(z.device)

    @staticmethod
    def masked_mean(squared: torch.Tensor, masks: torch.Tensor | None, n_instance: int) -> torch.Tensor:
        """Per-example mean of `squared` [B, C, h, w]; with loss masks [n_instance, 1, H, W] the
        mean weighted by each mask area-averaged to the latent grid, ``sum(m * e) / (C * sum(m))``
        (class examples, after the instance ones, keep weight 1 everywhere). A view whose mask kept
        nothing (cropped or scaled away) contributes 0, not 0 / 0."""
        if masks is None:
            return squared.mean(dim=(1, 2, 3))
        weights = torch.ones_like(squared[:, :1])
        weights[:n_instance] = F.interpolate(masks.to(squared), size=squared.shape[-2:], mode="area")
        return (weights * squared).sum(dim=(1, 2, 3)) / (squared.shape[1] * weights.sum(dim=(1, 2, 3)).clamp_min(1e-12))

    def cached_latents(self, keys: list[str], pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """A posterior sample ``(mean + std * randn) * scaling`` per view (``mean * scaling`` unless
        `sample`), the VAE run once per distinct view.

        Each view is encoded alone, so its cached posterior does not depend on which batch first held
        it (a resumed run refills the cache with the same values). The single ``randn`` over the whole
        batch is the draw ``latent_dist.sample()`` makes, so the noise stream matches the uncached path.
        """
        vae = self.backbone.vae
        posteriors = []
        for i, key in enumerate(keys):
            posterior = self._latent_cache.get(key) if key else None
            if posterior is None:
                dist = vae.encode(pixels[i : i + 1].to(self.device, vae.dtype)).latent_dist
                posterior = (dist.mean[0], dist.std[0])
                if key:  # "" names a view that is not kept (resize augmentation: nearly every view is new)
                    self._latent_cache[key] = posterior
            posteriors.append(posterior)
        mean = torch.stack([m for m, _ in posteriors])
        z = mean
        if sample:
            std = torch.stack([s for _, s in posteriors])
            z = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return (z * vae.config.scaling_factor).float()

    def cached_text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Conditionings of frozen text encoders (`encode_prompt`: on SDXL with the pooled embedding), each distinct prompt encoded once (alone)."""
        for prompt in prompts:
            if prompt not in self._text_cache and len(self._text_cache) < MAX_CACHED_PROMPTS:
                self._text_cache[prompt] = self.backbone.encode_prompt([prompt])[0]
        return torch.stack([
            self._text_cache[p] if p in self._text_cache else self.backbone.encode_prompt([p])[0] for p in prompts
        ])

    def seed_micro_batch(self, batch: dict[str, Any]) -> None:
        """Seed every random draw of this micro-batch (noise, t, VAE sample, LoRA dropout) from its index."""
        torch.manual_seed(mix_seed(int(self.cfg.seed), int(batch["example_index"][0]), 7))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seed_micro_batch(batch)
        loss, parts = self.compute_loss(batch)
        batch_size = batch["pixel_values"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict(parts, batch_size=batch_size)
        return loss

    def on_fit_start(self) -> None:
        c = self.cfg.compile
        if c.unet:  # after class images were generated; the first training step pays the compilation
            self.backbone.unet.compile(backend=c.backend, mode=c.mode)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        o, trainer = self.cfg.optim, self.trainer
        scale = self.cfg.data.batch_size * trainer.accumulate_grad_batches * trainer.world_size if o.scale_lr else 1
        groups = self.parameter_groups(scale)
        self._lrs = [group["lr"] for group in groups]
        optimizer = make_optimizer(o.name, groups, o.betas, o.weight_decay, o.eps)
        scheduler = get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self, lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Trainable parameters with their lr: text-encoder ones take ``optim.text_encoder_lr`` when set."""
        self.backbone.adapter.trainable_parameters(self.backbone)  # marks them trainable
        named = self.backbone.adapter.named_trainable(self.backbone)
        lr, text_lr = float(self.cfg.method.lr), self.cfg.optim.text_encoder_lr
        if text_lr is None:
            return [{"params": [p for _, p in named], "lr": lr * lr_scale}]
        groups = [
            {"params": [p for n, p in named if not n.startswith("text_encoder")], "lr": lr * lr_scale},
            {"params": [p for n, p in named if n.startswith("text_encoder")], "lr": float(text_lr) * lr_scale},
        ]
        return [g for g in groups if g["params"]]

    def on_train_start(self) -> None:
        # A resume restores the checkpoint's optimizer and scheduler, learning rates included: apply this run's.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = list(self._lrs)
            for group, lr, factor in zip(scheduler.optimizer.param_groups, self._lrs, scheduler.lr_lambdas):
                group["initial_lr"] = lr
                group["lr"] = lr * factor(scheduler.last_epoch)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
            self.ema.update(self.backbone.adapter.named_trainable(self.backbone))
        # Lightning zeroes gradients after the next forward pass; freeing them now keeps them out of
        # the forward's peak (a whole UNet of gradients for DreamBooth).
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ validation samples
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.cfg.validation.every_n_steps
        step = self.trainer.global_step
        if every and step % every == 0 and step != self._last_validation_step and self.trainer.is_global_zero:
            self._last_validation_step = step
            self.log_validation_images(step)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], num_images: int, steps: int, guidance_scale: float, seed: int) -> list[Any]:
        """PIL images from the current adapted model (DDIM), one generator per image."""
        from dreamsteer.diffusion.schedulers import make_scheduler

        backbone = self.backbone
        pipe = backbone.pipeline(make_scheduler("ddim", backbone.scheduler.config))
        prompts = [p for p in prompts for _ in range(num_images)]
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        was_training = self.training
        self.eval()
        try:
            context = self._trainer.precision_plugin.forward_context() if self._trainer is not None else contextlib.nullcontext()
            with context, self.exported_weights():
                images = pipe(**backbone.family.pipeline_prompt_kwargs(backbone.encode_prompt(prompts)), num_inference_steps=steps,
                              guidance_scale=guidance_scale, generator=generators).images
        finally:
            self.train(was_training)
        return images

    def log_validation_images(self, step: int) -> None:
        """Sample the validation prompts and record them: PNG files (``validation.save_images``), TensorBoard
        images, W&B images. Nothing is sampled when none of these would record it (e.g. the CSV logger)."""
        v, logger = self.cfg.validation, self.logger
        to_files = v.save_images and self.samples_dir is not None
        to_tensorboard = bool(logger) and hasattr(logger.experiment, "add_images")
        to_wandb = bool(logger) and hasattr(logger, "log_image")
        if not (to_files or to_tensorboard or to_wandb):
            return
        prompts = list(v.prompts) or [c.instance_prompt for c in resolve_concepts(self.cfg.data)]
        images = self.sample_images(prompts, v.num_images, v.steps, v.guidance_scale, v.seed)
        self.last_validation = [(prompt, im) for i, prompt in enumerate(prompts) for im in images[i * v.num_images : (i + 1) * v.num_images]]
        for i, prompt in enumerate(prompts):
            group = images[i * v.num_images : (i + 1) * v.num_images]
            if to_files:
                for j, image in enumerate(group):
                    save_image_atomic(image, self.samples_dir / f"step{step:06d}" / f"prompt{i}_{j}.png")
            if to_tensorboard:
                batch = np.stack([np.asarray(im) for im in group])
                logger.experiment.add_images(f"validation/{i}: {prompt}", batch, global_step=step, dataformats="NHWC")
            if to_wandb:
                logger.log_image(key=f"validation/{i}", images=group, step=step, caption=[prompt] * len(group))
        if to_files:
            write_json_atomic({"step": step, "prompts": prompts, "seed": v.seed}, self.samples_dir / f"step{step:06d}" / "prompts.json")

    # ------------------------------------------------------------------ export
    def caption_tag_frequency(self) -> dict[str, dict[str, int]] | None:
        """kohya's tag counts of the caption files used, per photo folder (None without captions or when the photos are gone)."""
        if not self.cfg.data.captions:
            return None
        captions = {}
        for concept in resolve_concepts(self.cfg.data):
            try:
                items = read_instance_items(concept.instance_dir, captions=True)
            except (OSError, ValueError):
                return None
            texts = [item.caption for item in items if item.caption]
            if texts:
                captions.setdefault(Path(concept.instance_dir).name, []).extend(texts)
        return kohya.tag_frequency(captions) if captions else None

    def export_info(self) -> dict[str, Any]:
        d, prior = self.cfg.data, self.cfg.loss.prior_preservation
        concepts = resolve_concepts(d)
        info = {
            "caption_tag_frequency": self.caption_tag_frequency(),
            "instance_prompt": concepts[0].instance_prompt,
            "class_prompt": concepts[0].class_prompt if prior else None,
            "training_steps": int(self.trainer.global_step) if self._trainer is not None else None,
            "training": {
                "method": OmegaConf.to_container(self.cfg.method),
                "seed": int(self.cfg.seed),
                "resolution": self.cfg.data.resolution or self.backbone.resolution,
                "batch_size": int(d.batch_size),
                "world_size": int(self.trainer.world_size) if self._trainer is not None else 1,
                "resumes": self.resumes,
                "pivot": OmegaConf.to_container(self.cfg.pivot) if self.backbone.words is not None else None,
            },
        }
        if d.get("concepts") is not None:  # every concept (the top-level prompts are the first one's)
            info["concepts"] = [
                {"token": c.token, "instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt if prior else None} for c in concepts
            ]
        return info

    def export(self, out_dir: str | Path, training_steps: int | None = None) -> Path:
        info = self.export_info()
        if training_steps is not None:
            info["training_steps"] = training_steps
        with self.exported_weights():
            return export_adapter(self.backbone, out_dir, info, samples=self.last_validation)

    def on_train_end(self) -> None:
        if self.export_dir is not None and self.trainer.is_global_zero:
            path = self.export(self.export_dir)
            print(f"exported {self.method} adapter to {path}")


class DreamBoothModule(PersonalizeModule):
    """DreamBooth (Ruiz et al. 2023): fine-tune the whole UNet (optionally the text encoder)."""

    method = "dreambooth"

    @staticmethod
    def adapter_kwargs(m: DictConfig) -> dict[str, Any]:
        # keep_base=False: no second UNet in memory during training (prior images are made before fit)
        return {"train_text_encoder": m.train_text_encoder, "keep_base": False}


class LoraModule(PersonalizeModule):
    """LoRA (Hu et al. 2021) through peft on the UNet attention projections (optionally the text encoder)."""

    method = "lora"

    @staticmethod
    def adapter_kwargs(m: DictConfig) -> dict[str, Any]:
        return {
            "rank": m.rank, "alpha": m.alpha, "target_modules": list(m.target_modules), "dropout": m.dropout,
            "text_encoder": m.train_text_encoder, "text_target_modules": list(m.text_target_modules),
            "variant": m.variant, "conv_target_modules": list(m.conv_target_modules), "conv_rank": m.conv_rank, "conv_alpha": m.conv_alpha,
            "rank_pattern": dict(m.rank_pattern or {}), "alpha_pattern": dict(m.alpha_pattern or {}),
            "decompose_both": m.decompose_both, "decompose_factor": m.decompose_factor,
        }


class TextualInversionModule(PersonalizeModule):
    """Textual Inversion (Gal et al. 2023): learn new token embeddings only."""

    method = "textual_inversion"

    @staticmethod
    def adapter_kwargs(m: DictConfig) -> dict[str, Any]:
        return {"tokens": list(m.tokens), "initializer_token": m.initializer_token, "num_vectors": m.num_vectors}

    @property
    def required_tokens(self) -> list[str]:
        return list(self.cfg.method.tokens)


class CustomDiffusionModule(PersonalizeModule):
    """Custom Diffusion (Kumari et al. 2023): cross-attention K/V (optionally Q/out) + modifier token embeddings."""

    method = "custom_diffusion"

    @staticmethod
    def adapter_kwargs(m: DictConfig) -> dict[str, Any]:
        init = m.initializer_token if isinstance(m.initializer_token, str) else list(m.initializer_token)
        return {"modifier_tokens": list(m.modifier_tokens), "initializer_token": init, "train_q_out": m.train_q_out, "detach_sot": m.detach_sot}

    @property
    def required_tokens(self) -> list[str]:
        return list(self.cfg.method.modifier_tokens)


MODULES: dict[str, type[PersonalizeModule]] = {
    cls.method: cls for cls in (DreamBoothModule, LoraModule, TextualInversionModule, CustomDiffusionModule)
}
