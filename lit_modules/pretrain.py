"""Text-to-image training from scratch as LightningModules: the VAE, then the UNet + text encoder,
then (optionally) GLIGEN's gated layers on a trained model.

`VaePretrainModule` trains an `AutoencoderKL` on images ``x`` in [-1, 1]::

    q(z | x) = N(mu(x), sigma(x)^2),   r = D(mu(x)),
    L = mean |r - x| + mean (r - x)^2 + kl_weight * KL(q(z | x) || N(0, I))

With `train_encoder` False only the decoder trains (SD's "ft-MSE" decoder fine-tune): the latents
stay exactly what a diffusion model trained on the encoder saw, so the better decoder drops in.

The squared term weighs the few large errors (on objects, a tenth of the pixels) over the many
small ones (on the flat background), which an L1 loss alone treats alike.

With `flat_weight` > 0 the encoder is also asked to encode a flat background as a flat latent::

    L += flat_weight * sum_c Var_{bg}(mu_c) / sum_c Var(mu_c)

the spread of each latent channel over an image's background cells (latent cells whose pixels all
equal the image's median color) against its spread over the whole batch, so
shrinking the latents does not lower it. Without it the toy VAE wrote each object into the background
cells around it, most on gray (0 in [-1, 1], where the background's own code is weakest; docs/toy_experiments.md).

It decodes the posterior mean, not a sample: with SD's tiny KL weight the variance starts at 1 and
only slowly shrinks, and decoding samples that noisy left the toy VAE blurry for hundreds of steps.

`DiffusionPretrainModule` trains the denoiser of a Stable-Diffusion-shaped model with the VAE frozen::

    z = s * mu(x)  (s: the VAE's scaling_factor),  eps ~ N(0, I),  t ~ U{0..T-1}
    z_t = sqrt(a_t) z + sqrt(1 - a_t) eps,     L = mean (eps_theta(z_t, t, E(c)) - eps)^2

With `noise_offset` > 0 the noise gets a per-image, per-channel constant,
``eps = n + noise_offset * m``, ``n ~ N(0, I)``, ``m ~ N(0, 1)`` of shape ``[B, C, 1, 1]`` (offset
noise): SD's schedule leaves ~7% of the image mean in the last noise level, so a model trained on
plain noise starts every sample from a mid-gray mean and cannot reach a black or white background.

`timesteps="cubic"` draws ``t = floor((1 - u^3) T)``, ``u ~ U(0, 1)``, instead of ``t ~ U{0..T-1}``
(T2I-Adapter's non-uniform sampling): most draws land at high noise, where the layout is decided and
a layout condition (GLIGEN's boxes) is the only source of it; at low noise ``z_t`` already shows
where every object is, so there a grounding signal barely lowers the loss.

`min_timestep` / `max_timestep` (exclusive) restrict either draw to ``[min, max)``: uniform
``t ~ U{min..max-1}``, cubic ``t = min + floor((1 - u^3) (max - min))`` (kohya's `--min_timestep` /
`--max_timestep`; the personalize task's `loss.min_timestep` / `loss.max_timestep`).

`loss_weighting` weighs each item's epsilon error by ``w(t)``: ``eps`` 1; ``x0`` ``(1 - a_t) / a_t``
(1/SNR: the same error measured on ``z_0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)``); ``v`` ``1 / a_t``
(the error of ``v = sqrt(a_t) eps - sqrt(1 - a_t) z``). Both put the weight on high noise levels, which
epsilon's loss nearly ignores: there the loss is ``SNR * |z_0 error|^2``, so a condition that only tells
the layout (GLIGEN's boxes) barely lowers it.

The caption ``c`` is replaced by "" with probability `caption_dropout` (classifier-free guidance needs
the unconditional model). In the ``gligen`` stage the UNet also gets the grounding tokens of each
object's phrase and box, dropped together with the caption, or on their own with probability
`grounding_dropout` (then items with boxes but no caption make the boxes the only source of the
objects). Only GLIGEN's new layers (``position_net`` and the gated self-attention ``fuser``s) train,
as in GLIGEN; with `freeze_unet` False the whole UNet trains with them. The text encoder trains when
`train_text_encoder` (the ``unet`` stage, and a GLIGEN model trained from scratch).

With `ungrounded_p` each item runs, with that probability, through the UNet with GLIGEN's layers off
(``fuser(h) = h``), its caption kept: the plain UNet that scheduled sampling (GLIGEN's and ReGround's
beta) runs after its first grounded steps, which a UNet trained with the layers always on has never
been trained as. With `phrase_dropout` each object's phrase and box is dropped on its own (its slot
gets GLIGEN's null token) while the caption still names it: a caption may name objects that have no
box, as in ReGround's benchmark, and the model must still draw them.

The learning rate warms up linearly over `warmup_steps`, then stays constant or, with `decay_steps`,
follows a cosine to 0 at that step (`lr_factor`).

An exponential moving average of the trained weights (`lit_modules.ema.ParameterEMA`, with diffusers'
warm-up ``d_n = min(decay, (1 + n) / (10 + n))``) is what gets exported.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any, Sequence

import lightning as L
import torch

from dreamsteer.lit_modules.ema import ParameterEMA

# Frozen modules stay in eval mode on purpose; Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def lr_factor(step: int, warmup_steps: int, decay_steps: int = 0) -> float:
    """The learning rate's factor at optimizer step `step`: linear warm-up from 0 over `warmup_steps`, then
    constant, or with `decay_steps` a cosine decay ``0.5 (1 + cos(pi (step - warmup) / (decay_steps - warmup)))``
    that reaches 0 at step `decay_steps` (a run's last step: its weights settle where the noise of a
    constant rate would keep them moving)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if not decay_steps or step < warmup_steps:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int = 0) -> dict[str, Any]:
    """`lr_factor` as a per-step Lightning scheduler."""
    lam = functools.partial(lr_factor, warmup_steps=warmup_steps, decay_steps=decay_steps)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lam), "interval": "step"}


def background_cells(images: torch.Tensor, factor: int, tolerance: float = 0.02) -> torch.Tensor:
    """[B, 1, H / factor, W / factor] bool: latent cells of a flat background. A pixel is background when
    every channel is within `tolerance` of the image's median color (the background of a scene, which
    covers most of it); a cell when all its pixels are. Cells next to an object count: what the encoder
    writes there about the object is what the term removes."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    off = ((images - median).abs() > tolerance).any(dim=1, keepdim=True).float()
    return torch.nn.functional.max_pool2d(off, factor) == 0


def flat_background_loss(mu: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``sum_c Var_bg(mu_c) / sum_c Var(mu_c)``: each image's spread of the latent over its background
    `cells` (the mean of the squared deviation from that image's background mean, pooled over images),
    against the latent's spread over the whole batch; 0 when no image has a background cell."""
    w = cells.to(mu.dtype)
    count = w.sum(dim=(2, 3), keepdim=True)
    if count.sum() == 0:
        return mu.sum() * 0.0
    mean = (mu * w).sum(dim=(2, 3), keepdim=True) / count.clamp(min=1)
    within = ((mu - mean).pow(2) * w).sum() / (count.sum() * mu.shape[1])
    return within / mu.var(dim=(0, 2, 3)).mean()


class VaePretrainModule(L.LightningModule):
    """Trains an AutoencoderKL with L1 + squared reconstruction losses, a small KL term and optionally
    the flat-background term (formulas above)."""

    def __init__(self, vae: torch.nn.Module, lr: float, kl_weight: float, warmup_steps: int = 0, train_encoder: bool = True,
                 decay_steps: int = 0, flat_weight: float = 0.0):
        super().__init__()
        self.vae = vae
        self.lr, self.kl_weight, self.warmup_steps, self.train_encoder = lr, kl_weight, warmup_steps, train_encoder
        self.decay_steps, self.flat_weight = decay_steps, flat_weight
        if not train_encoder:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixel_values"]
        with torch.set_grad_enabled(self.train_encoder):
            posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mode()).sample
        l1 = (recon - x).abs().mean()
        l2 = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, so kl_weight does not depend on the image size
        loss = l1 + l2 + self.kl_weight * kl
        logs = {"train/l1": l1, "train/l2": l2, "train/kl": kl}
        if self.flat_weight:
            flat = flat_background_loss(posterior.mean, background_cells(x, x.shape[-1] // posterior.mean.shape[-1]))
            loss = loss + self.flat_weight * flat
            logs["train/flat"] = flat
        self.log_dict({"train/loss": loss, **logs}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.vae.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.0)
        return {"optimizer": optimizer, "lr_scheduler": lr_schedule(optimizer, self.warmup_steps, self.decay_steps)}

    def export(self) -> torch.nn.Module:
        """What this stage produces: the VAE."""
        return self.vae

    @torch.no_grad()
    def set_scaling_factor(self, images: torch.Tensor) -> float:
        """Set the VAE's scaling_factor to 1 / std of the latent means of `images`, as SD did, so
        the diffusion model sees latents of unit spread; returns it."""
        self.vae.eval()
        z = self.vae.encode(images.to(self.device)).latent_dist.mean
        scale = float(1.0 / z.std())
        self.vae.register_to_config(scaling_factor=scale)
        return scale


class DiffusionPretrainModule(L.LightningModule):
    """Trains the UNet (and the text encoder when `train_text_encoder`), or GLIGEN's layers when
    `grounded`, with the VAE frozen; keeps an EMA of the trained weights (formulas above)."""

    def __init__(
        self,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        unet: torch.nn.Module,
        scheduler: Any,
        lr: float,
        warmup_steps: int,
        caption_dropout: float,
        ema_decay: float,
        train_text_encoder: bool,
        grounded: bool = False,
        noise_offset: float = 0.0,
        timesteps: str = "uniform",
        loss_weighting: str = "eps",
        freeze_unet: bool = True,
        grounding_dropout: float | None = None,
        decay_steps: int = 0,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        ungrounded_p: float = 0.0,
        phrase_dropout: float = 0.0,
    ):
        super().__init__()
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.lr, self.warmup_steps, self.decay_steps, self.caption_dropout = lr, warmup_steps, decay_steps, caption_dropout
        self.grounded, self.noise_offset, self.timesteps = grounded, noise_offset, timesteps
        self.loss_weighting, self.grounding_dropout = loss_weighting, grounding_dropout
        self.ungrounded_p, self.phrase_dropout = ungrounded_p, phrase_dropout
        self.vae.requires_grad_(False).eval()
        if grounded:  # GLIGEN: the pretrained model stays frozen, only the new layers learn (unless not `freeze_unet`)
            for name, p in self.unet.named_parameters():
                p.requires_grad_(not freeze_unet or name.startswith("position_net.") or ".fuser." in name)
        else:
            self.unet.requires_grad_(True)  # also when handed a loaded (frozen) model
        self.text_encoder.requires_grad_(train_text_encoder)
        self.trained = [m for m in (self.unet, self.text_encoder) if any(p.requires_grad for p in m.parameters())]
        self.ema = ParameterEMA(self.named_trainable(), ema_decay)  # with diffusers' warm-up: a short run's EMA is not stale
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        T = len(self.alphas_cumprod)
        self.min_timestep, self.max_timestep = min_timestep, T if max_timestep is None else max_timestep
        if not 0 <= self.min_timestep < self.max_timestep <= T:
            raise ValueError(f"timesteps [{min_timestep}, {max_timestep}) must satisfy 0 <= min < max <= {T}")

    def on_train_start(self) -> None:
        # Every rank is seeded alike; offset the generator so ranks draw different noise and timesteps.
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained parameters, named ``<index in self.trained>.<parameter name>``."""
        return [(f"{i}.{name}", p) for i, m in enumerate(self.trained) for name, p in m.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        if self.text_encoder not in self.trained:
            self.text_encoder.eval()
        return self

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(captions), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def grounding(self, phrases: Sequence[Sequence[str]], boxes: Sequence[torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """GLIGEN's ``cross_attention_kwargs["gligen"]`` for a batch; items where `keep` is False get
        no grounding tokens (masks 0), as the unconditional half of classifier-free guidance does."""
        from dreamsteer.diffusion.gligen import MAX_OBJECTS

        b, dim = len(phrases), self.unet.config.cross_attention_dim
        flat = [p for item in phrases for p in item]
        tokens = self.tokenizer(flat, padding=True, truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            pooled = self.text_encoder(**tokens.to(self.device)).pooler_output
        # One scatter per tensor: per-item writes (and reading `keep` item by item) synchronised with the
        # GPU hundreds of times a step (that version trained 3.9 steps/s at batch 256 on an H200).
        counts = torch.tensor([len(item) for item in phrases])
        row = torch.repeat_interleave(torch.arange(b), counts).to(self.device)
        slot = torch.cat([torch.arange(int(n)) for n in counts]).to(self.device)
        box_t = torch.zeros(b, MAX_OBJECTS, 4, device=self.device)
        box_t[row, slot] = torch.cat([torch.as_tensor(x).reshape(-1, 4).to(self.device, torch.float32) for x in boxes])
        masks = torch.zeros(b, MAX_OBJECTS, device=self.device)
        masks[row, slot] = keep.to(self.device).float()[row]
        emb = torch.zeros(b, MAX_OBJECTS, dim, device=self.device, dtype=pooled.dtype)
        emb[row, slot] = pooled
        return {"boxes": box_t, "positive_embeddings": emb, "masks": masks}

    def draw_timesteps(self, b: int) -> torch.Tensor:
        lo, hi = self.min_timestep, self.max_timestep
        if self.timesteps == "cubic":
            u = torch.rand(b, device=self.device)
            return lo + ((1 - u**3) * (hi - lo)).long().clamp(max=hi - lo - 1)
        return torch.randint(lo, hi, (b,), device=self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixel_values"]
        b = x.shape[0]
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        keep = torch.rand(b, device=self.device) >= self.caption_dropout
        captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]
        text_emb = self.encode_text(captions)
        t = self.draw_timesteps(b)
        eps = torch.randn_like(z)
        if self.noise_offset:
            eps = eps + self.noise_offset * torch.randn(b, z.shape[1], 1, 1, device=self.device)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        if self.grounded:
            keep_boxes = keep if self.grounding_dropout is None else torch.rand(b, device=self.device) >= self.grounding_dropout
            gligen = self.grounding(batch["phrases"], batch["boxes"], keep_boxes)
            if self.phrase_dropout:  # drawn only when asked for, as below
                gligen["masks"] = gligen["masks"] * (torch.rand_like(gligen["masks"]) >= self.phrase_dropout)
            plain = torch.zeros(b, dtype=torch.bool, device=self.device)
            if self.ungrounded_p:  # drawn only when asked for: runs without it draw the same noise as before it existed
                plain = torch.rand(b, device=self.device) < self.ungrounded_p
            pred = self.grounded_prediction(z_t, t, text_emb, gligen, plain)
        else:
            pred = self.unet(z_t, t, encoder_hidden_states=text_emb).sample
        loss = (self.loss_weight(a.view(b)) * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def grounded_prediction(
        self, z_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, gligen: dict[str, torch.Tensor], plain: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's noise prediction for a batch of the gligen stage: with GLIGEN's layers on (the
        grounding tokens in `gligen`), but for the `plain` items, which run without them: the UNet skips
        its fusers when it gets no grounding, as with the fusers switched off."""
        if not plain.any():
            return self.unet(z_t, t, encoder_hidden_states=text_emb, cross_attention_kwargs={"gligen": gligen}).sample
        pred = torch.empty_like(z_t)
        on = ~plain
        if on.any():
            grounding = {key: value[on] for key, value in gligen.items()}
            pred[on] = self.unet(z_t[on], t[on], encoder_hidden_states=text_emb[on], cross_attention_kwargs={"gligen": grounding}).sample
        pred[plain] = self.unet(z_t[plain], t[plain], encoder_hidden_states=text_emb[plain]).sample
        return pred

    def loss_weight(self, a: torch.Tensor) -> torch.Tensor:
        """``w(t)`` of `loss_weighting` for ``a = alphas_cumprod[t]`` (module docstring)."""
        if self.loss_weighting == "x0":
            return (1 - a) / a
        if self.loss_weighting == "v":
            return 1 / a
        return torch.ones_like(a)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update(self.named_trainable())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" not in checkpoint:
            raise ValueError("checkpoint: holds no EMA state (written by an older version of the pretrain task); start the stage anew")
        self.ema.load_state_dict(checkpoint["ema"], "checkpoint")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=0.0)
        return {"optimizer": optimizer, "lr_scheduler": lr_schedule(optimizer, self.warmup_steps, self.decay_steps)}

    def export(self):
        """What this stage produces: the pipeline, with the EMA weights where they were trained."""
        from dreamsteer.diffusion.toy import make_pipeline

        with self.ema.swapped_in(self.named_trainable()):
            averaged = [copy.deepcopy(m).requires_grad_(False).eval() for m in self.trained]
        by_id = {id(m): e for m, e in zip(self.trained, averaged)}
        unet, text_encoder = by_id.get(id(self.unet), self.unet), by_id.get(id(self.text_encoder), self.text_encoder)
        return make_pipeline(self.vae, text_encoder, self.tokenizer, unet, self.scheduler)
