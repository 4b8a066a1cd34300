"""DreamSteerer as a LightningModule: a few EDSD steps with mode-shifting regularization on one source image.

Per step (``t ~ U[t_min, t_max]``, ``eps ~ N(0, I)``, seeded by the step index):

    L = L_EDSD(phi) + lambda_ms * L_ms(phi),
    L_ms = mean_i || eps_phi(sqrt(a_s) z_i + sqrt(1 - a_s) n_i, s_i, y_ref) - n_i ||^2

with ``L_EDSD`` from `distill.edsd` (pre-trained branch = the same backbone with its adapter disabled;
personalized branch = the backbone with the adapter) and ``z_i`` the mode-shifting latents: images of
the personal concept sampled by the personalized model with spatial-feature guidance toward the
source layout (`distill.guided_sampling`) or, on a GLIGEN base model with ``mode_shift.guidance=gligen_box``,
grounded by the subject's box in the source photo (`diffusion.reground.grounded_sample`), optionally
regenerated every K steps. ``phi`` is exactly
the baseline's own trainable state (``backbone.adapter.trainable_parameters``): LoRA weights, TI rows,
Custom Diffusion k/v (+ modifier rows), or the DreamBooth UNet. ``M`` is the subject mask
(`distill.subject_mask`) of the source class token, computed once by the pre-trained model.
"""
from __future__ import annotations

import difflib
import hashlib
import string
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import lightning as L
import torch

from dreamsteer.diffusion.gligen import LayoutError, NotGligenError, box_from_mask, require_gligen, validate_layout
from dreamsteer.diffusion.reground import WIRINGS, grounded_sample
from dreamsteer.distill.edsd import REDUCTIONS, check_jacobian, denoising_loss, edsd_loss
from dreamsteer.distill.guided_sampling import GUIDANCE_MODES, NORMALIZATIONS, ddim_sample, make_guidance
from dreamsteer.distill.subject_mask import SubjectMask, subject_mask

# Mode-shifting guidance that is a sampler of its own rather than a `Guidance` inside `ddim_sample`: GLIGEN's
# grounding inputs follow each UNet call's batch and the wiring/fuser flags must be restored afterwards.
GLIGEN_BOX = "gligen_box"
ARTICLES = ("a", "an", "the")
_PUNCTUATION = string.punctuation.replace("<", "").replace(">", "")  # keep placeholder brackets: "<sks>"


@dataclass
class EDSDConfig:
    t_min: int = 50  # timestep range of EDSD (DDS's [50, 950))
    t_max: int = 950
    eta: float = 0.1  # step size of the single-step DDS-S perturbation z_hat = z_src - eta * M * d
    jacobian: float = -1.0  # J in J * I replacing d eps / d x (paper: -I); 0 and +1 for ablation
    guidance_src: float = 7.5  # CFG of the pre-trained branch of the DDS-S direction d (eps_hat_phi0(x_t_src, y_src))
    guidance_ref: float = 7.5  # CFG of the personalized branch of d (eps_hat_phi(x_t_src, y_ref))
    residual_cfg: bool = False  # False: the residual on plain eps (the paper's loss); True: with the CFG above
    reduction: str = "mean"  # mean | sum over latent elements


@dataclass
class ModeShiftConfig:
    lambda_ms: float = 1.0  # weight of the denoising loss on the mode-shifting images (0 = EDSD alone)
    n_ms: int = 4  # number of guided images of the concept
    batch_size: int = 0  # mode-shifting latents per step (0 = all n_ms)
    sampling_steps: int = 25  # DDIM steps to generate them
    guidance_scale: float = 7.5  # CFG of that sampling
    regenerate_every: int = 0  # regenerate them from the current model every K steps (0 = never)
    t_min: int = 0  # timestep range of the denoising loss
    t_max: int = 1000
    guidance: str = "features"  # features | none (plain DDIM) | gligen_box; other modes register in GUIDANCE_MODES
    weight: float = 0.2  # feature-guidance step w (see distill.guided_sampling)
    start: float = 0.0  # guidance window, as fractions of the sampling steps
    end: float = 0.5
    normalize: str = "rms"  # rms | none
    iters: int = 1  # guidance moves per guided step
    backtracks: int = 8  # halvings of a move that would not lower the energy before the sample stays put
    places: list = field(default_factory=lambda: ["up"])  # self-attention layers of the energy
    divisors: list = field(default_factory=lambda: [2, 4])
    feature_prompt: str = "ref"  # prompt of the source branch of the energy: ref | src
    log_unguided: bool = False  # also sample unguided images from the same noise (a full extra sampling run), for TensorBoard
    # guidance=gligen_box only (a GLIGEN base model): grounded sampling, diffusion.reground.grounded_sample
    phrase: Optional[str] = None  # the grounded phrase; None: the subject's words of ref_prompt ("a sks cat")
    box: Optional[list] = None  # [x0, y0, x1, y1] fractions of the source photo; None: box of the subject mask
    wiring: str = "parallel"  # parallel (ReGround) | sequential (GLIGEN)
    beta: float = 0.3  # scheduled sampling: grounding on for the first int(beta * sampling_steps) steps


@dataclass
class MaskConfig:
    enabled: bool = True  # M = subject mask; False: M = 1 everywhere
    timesteps: list = field(default_factory=lambda: [100, 300, 500])
    divisors: list = field(default_factory=lambda: [2, 4])
    threshold: float = 0.5
    dilation: int = 0  # latent pixels (the editor's dds_sm default: steering and editing mask the same region)
    pretrained: bool = True  # compute it with the adapter disabled


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool = False  # recompute UNet (and trained text encoder) activations in backward
    micro_batch: int = 0  # UNet rows per graph (0: one graph per step); the gradient is the same


@dataclass
class OptimConfig:
    # learning rates per baseline: personalize's defaults (conf/method/<kind>.yaml)
    lr: dict = field(default_factory=lambda: {"lora": 1e-4, "textual_inversion": 5e-4, "custom_diffusion": 1e-5, "dreambooth": 5e-6})
    # train.steer: steer at the rate the adapter was trained with (its adapter.json) when it records one, instead of lr[<kind>]
    lr_from_adapter: bool = True
    name: str = "adamw"  # adamw | adamw8bit (bitsandbytes: 8-bit optimizer state)
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: Optional[float] = 1.0


OPTIMIZERS = ("adamw", "adamw8bit")


def check_settings(edsd: EDSDConfig, ms: ModeShiftConfig, mask: MaskConfig, num_train_timesteps: int = 1000,
                   memory: MemoryConfig | None = None, optim: OptimConfig | None = None) -> None:
    """Raise ValueError naming the key for settings that cannot work (before any compute)."""
    check_jacobian(edsd.jacobian)
    if memory is not None and memory.micro_batch < 0:
        raise ValueError(f"config key 'memory.micro_batch': must be >= 0 (0: one graph), got {memory.micro_batch}")
    if optim is not None and optim.name not in OPTIMIZERS:
        raise ValueError(f"config key 'optim.name': {optim.name!r} is not one of {list(OPTIMIZERS)}")
    if edsd.reduction not in REDUCTIONS:
        raise ValueError(f"config key 'edsd.reduction': {edsd.reduction!r} is not one of {list(REDUCTIONS)}")
    for prefix, lo, hi in (("edsd", edsd.t_min, edsd.t_max), ("mode_shift", ms.t_min, ms.t_max)):
        if not 0 <= lo < hi <= num_train_timesteps:
            raise ValueError(f"config keys '{prefix}.t_min'/'{prefix}.t_max': need 0 <= t_min < t_max <= {num_train_timesteps}, got [{lo}, {hi})")
    if edsd.eta < 0:
        raise ValueError(f"config key 'edsd.eta': must be >= 0, got {edsd.eta}")
    if ms.guidance not in guidance_choices():
        raise ValueError(f"config key 'mode_shift.guidance': {ms.guidance!r} is not one of {guidance_choices()}")
    if ms.wiring not in WIRINGS:
        raise ValueError(f"config key 'mode_shift.wiring': {ms.wiring!r} is not one of {list(WIRINGS)}")
    if not 0.0 <= ms.beta <= 1.0:
        raise ValueError(f"config key 'mode_shift.beta': the grounded fraction of the sampling steps must lie in [0, 1], got {ms.beta}")
    if ms.guidance == GLIGEN_BOX and ms.beta > 0 and int(ms.beta * ms.sampling_steps) == 0:
        raise ValueError(f"config key 'mode_shift.beta': int(beta * sampling_steps) = int({ms.beta} * {ms.sampling_steps}) = 0 "
                         "grounded steps, so the box would have no effect; raise mode_shift.beta or mode_shift.sampling_steps")
    if ms.phrase is not None and not ms.phrase.strip():
        raise ValueError("config key 'mode_shift.phrase': empty; give the subject's words (e.g. 'a sks cat') or null")
    if ms.box is not None:
        try:
            validate_layout([ms.phrase or "subject"], [ms.box])
        except LayoutError as err:
            raise LayoutError(f"config key 'mode_shift.box': {err}") from None
    if ms.normalize not in NORMALIZATIONS:
        raise ValueError(f"config key 'mode_shift.normalize': {ms.normalize!r} is not one of {list(NORMALIZATIONS)}")
    if ms.feature_prompt not in ("ref", "src"):
        raise ValueError(f"config key 'mode_shift.feature_prompt': {ms.feature_prompt!r} is not one of ['ref', 'src']")
    if ms.lambda_ms < 0 or ms.n_ms < 0 or ms.batch_size < 0 or ms.regenerate_every < 0 or ms.backtracks < 0:
        raise ValueError("config keys 'mode_shift.lambda_ms', 'n_ms', 'batch_size', 'regenerate_every', 'backtracks' must be >= 0")
    if ms.lambda_ms > 0 and ms.n_ms < 1:
        raise ValueError("config key 'mode_shift.n_ms': must be >= 1 when mode_shift.lambda_ms > 0")
    if ms.sampling_steps < 1:
        raise ValueError(f"config key 'mode_shift.sampling_steps': must be >= 1, got {ms.sampling_steps}")
    if not 0.0 <= mask.threshold <= 1.0 or mask.dilation < 0:
        raise ValueError(f"config keys 'mask.threshold'/'mask.dilation': need threshold in [0, 1] and dilation >= 0, "
                         f"got {mask.threshold} / {mask.dilation}")
    if mask.enabled and not mask.timesteps:
        raise ValueError("config key 'mask.timesteps': empty")


def guidance_choices() -> list[str]:
    """The values of ``mode_shift.guidance``: the registered `GUIDANCE_MODES` plus ``gligen_box``."""
    return sorted({*GUIDANCE_MODES, GLIGEN_BOX})


def check_model(backbone: Any, ms: ModeShiftConfig) -> None:
    """Raise NotGligenError naming ``mode_shift.guidance`` when ``gligen_box`` meets a base model without
    GLIGEN's gated layers (call it right after loading, before any compute)."""
    if ms.guidance != GLIGEN_BOX:
        return
    try:
        require_gligen(backbone.unet, backbone.source)
    except NotGligenError as err:
        raise NotGligenError(
            f"config key 'mode_shift.guidance': {GLIGEN_BOX!r} grounds the mode-shifting images with a GLIGEN box and needs a "
            f"GLIGEN base model (model.pretrained, the model the adapter was trained on); use mode_shift.guidance=features "
            f"with this one. {err}"
        ) from None


def _bare(word: str) -> str:
    return word.strip(_PUNCTUATION).lower()


def subject_phrase(source_prompt: str, ref_prompt: str, class_token: str) -> str:
    """The words of `ref_prompt` that name the subject, for GLIGEN grounding: the class token's noun (its
    last word; or the words put in its place) with the words `ref_prompt` inserts right around it, and
    the article before them.

    ``("a photo of a cat", "a photo of a sks cat", "cat") -> "a sks cat"``; with a Textual Inversion
    placeholder replacing the class word, ``"a photo of a <sks>"`` gives ``"a <sks>"``.
    """
    src, ref = source_prompt.split(), ref_prompt.split()
    noun = class_token.split()[-1].lower()  # "yellow circle": anchored at its noun
    new: set[int] = set()  # positions of ref words that ref inserts or substitutes
    anchor: int | None = None  # position in ref of the class token, or of the first word replacing it
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=src, b=ref, autojunk=False).get_opcodes():
        if op in ("insert", "replace"):
            new.update(range(j1, j2))
        hits = [i for i in range(i1, i2) if _bare(src[i]) == noun]
        if anchor is None and hits and op in ("equal", "replace"):
            anchor = j1 + hits[0] - i1 if op == "equal" else j1
    if anchor is None:
        raise ValueError(f"cannot find the subject of ref_prompt {ref_prompt!r} from class token {class_token!r} in source_prompt "
                         f"{source_prompt!r}; set mode_shift.phrase=<the subject's words, e.g. 'a sks cat'>")
    start = end = anchor
    while start - 1 in new:
        start -= 1
    while end + 1 in new:
        end += 1
    if start > 0 and _bare(ref[start - 1]) in ARTICLES:
        start -= 1
    return " ".join(ref[start:end + 1]).strip(_PUNCTUATION)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _widened(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 or wider (half-precision UNet outputs meet the fp32 loss)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _guided(out: torch.Tensor, scale: float) -> torch.Tensor:
    """``e_null + scale (e_cond - e_null)`` from rows ``[null, cond]``, or the single row ``[cond]``."""
    return out[:1] + scale * (out[1:2] - out[:1]) if out.shape[0] == 2 else out


NULL, REF = "null", "ref"  # the prompts of a personalized UNet row


@dataclass
class Row:
    """One row of a UNet call with gradient to phi: input (None: ``x_hat_t``, known later), timestep, prompt."""

    x: Optional[torch.Tensor]
    t: torch.Tensor
    prompt: str


@dataclass
class StepDraw:
    """A step's randomness: ``t``, ``eps``, ``x_t_src`` and the noised mode-shifting latents with their noise."""

    t: torch.Tensor
    eps: torch.Tensor
    x_t_src: torch.Tensor
    x_ms: Optional[torch.Tensor]
    t_ms: Optional[torch.Tensor]
    noise_ms: Optional[torch.Tensor]


class DreamSteererModule(L.LightningModule):
    """EDSD + mode-shifting fine-tuning of an attached adapter (see the module docstring for the loss)."""

    def __init__(
        self,
        backbone: Any,
        z_src: torch.Tensor,
        source_prompt: str,
        ref_prompt: str,
        class_token: str,
        edsd: EDSDConfig,
        mode_shift: ModeShiftConfig,
        mask: MaskConfig,
        optim: OptimConfig,
        seed: int = 0,
        progress: bool = True,
        memory: MemoryConfig | None = None,
    ):
        super().__init__()
        memory = memory if memory is not None else MemoryConfig()
        if backbone.adapter is None:
            raise ValueError("DreamSteerer needs a backbone with an attached personalization adapter")
        check_settings(edsd, mode_shift, mask, backbone.num_train_timesteps, memory, optim)
        check_model(backbone, mode_shift)
        self.bb = backbone
        # manual optimization: a step may back-propagate several micro-batches before the optimizer step
        self.automatic_optimization = False
        trainable = backbone.adapter.trainable_parameters(backbone)
        for p in trainable:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()  # fp32 master weights for half-precision models (mixed precision meets them)
        if memory.gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
            if any(n.startswith("text_encoder.") for n, _ in backbone.adapter.named_trainable(backbone)):
                backbone.text_encoder.gradient_checkpointing_enable()
        self.memory_cfg = memory
        # registered so Lightning moves them; the optimizer only sees the adapter's parameters
        self.unet = backbone.unet
        self.text_encoder = backbone.text_encoder
        self.register_buffer("z_src", z_src.detach().to(backbone.device, backbone.dtype), persistent=False)
        self.source_prompt = source_prompt
        # as written: `Backbone.tokenize` expands multi-vector TI placeholders itself ("<sks>" -> "<sks> <sks>_1 ...")
        self.ref_prompt = ref_prompt
        self.class_token = class_token
        # gligen_box: the grounded phrase and the box, found once; GLIGEN's phrase encoder calls the tokenizer
        # directly, so the phrase is expanded here
        self.phrase: str | None = None
        if mode_shift.guidance == GLIGEN_BOX:
            self.phrase = backbone.expand_prompt(mode_shift.phrase or subject_phrase(source_prompt, ref_prompt, class_token))
        self.ms_box: list[float] | None = None
        self.edsd_cfg, self.ms_cfg, self.mask_cfg, self.optim_cfg = edsd, mode_shift, mask, optim
        self.seed = seed
        self.progress = progress
        self.subject: SubjectMask | None = None
        self.ms_latents: torch.Tensor | None = None
        self.ms_unguided: torch.Tensor | None = None
        self.ms_rounds = 0  # how many times the mode-shifting images were generated
        self.timings = {"mask": 0.0, "guided_sampling": 0.0, "unguided_sampling": 0.0, "steps": 0.0}
        self._step_start = 0.0

    # ------------------------------------------------------------------ helpers
    def _generator(self, *salt: int) -> torch.Generator:
        # a stable mix of (seed, salt): the same step always draws the same t, eps and noise
        digest = hashlib.sha256(repr((self.seed, *salt)).encode()).hexdigest()
        return torch.Generator(device="cpu").manual_seed(int(digest[:15], 16))

    def _randn(self, shape: tuple[int, ...], *salt: int) -> torch.Tensor:
        return torch.randn(shape, generator=self._generator(*salt)).to(self.bb.device, self.bb.dtype)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.bb.adapter.trainable_parameters(self.bb)

    def encode_ref(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_ref, null)`` embeddings of the personalized model (graph kept to trainable text rows)."""
        emb = self.bb.encode_prompt([self.ref_prompt, ""])
        return emb[:1], emb[1:]

    @torch.no_grad()
    def target_eps(self, x_t_src: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-trained branch at the source: ``(eps_phi0(x_t_src, y_src), eps_hat_phi0(x_t_src, y_src))``,
        plain and with CFG ``edsd.guidance_src``, from one UNet call."""
        with self.bb.adapter_disabled():
            src, null = self.bb.encode_prompt([self.source_prompt, ""]).chunk(2)
            if self.edsd_cfg.guidance_src == 1.0:
                plain = self.bb.predict_eps(x_t_src, t, src)
                return plain, plain
            e_null, e_src = self.bb.predict_eps(torch.cat([x_t_src, x_t_src]), torch.cat([t, t]), torch.cat([null, src])).chunk(2)
            return e_src, e_null + self.edsd_cfg.guidance_src * (e_src - e_null)

    def compute_mask(self) -> SubjectMask | None:
        """``M`` of EDSD: the subject mask, or None (``M = 1``) with ``mask.enabled=false``."""
        return self.source_subject() if self.mask_cfg.enabled else None

    def source_subject(self) -> SubjectMask:
        """The class token's subject mask in the source photo, with the ``mask.*`` settings."""
        m = self.mask_cfg
        return subject_mask(self.bb, self.z_src, self.source_prompt, self.class_token, tuple(m.timesteps), tuple(m.divisors),
                            m.threshold, m.dilation, seed=self.seed, pretrained=m.pretrained)

    def subject_box(self) -> list[float]:
        """The box grounding the mode-shifting images (``gligen_box``): ``mode_shift.box``, else the tight box
        around the subject mask (computed for the box alone when ``mask.enabled=false``)."""
        if self.ms_cfg.box is not None:
            return [float(v) for v in self.ms_cfg.box]
        subject = self.subject if self.subject is not None else self.source_subject()
        return box_from_mask(subject.mask)

    @torch.no_grad()
    def generate_mode_shift(self, round_index: int = 0, unguided: bool = False) -> torch.Tensor:
        """``n_ms`` latents of ``y_ref`` from the personalized model, guided toward the source layout by its
        features, or grounded by the subject's box on a GLIGEN model (``unguided=True``: the same noise
        without guidance, for comparison)."""
        ms = self.ms_cfg
        noise = self._randn((ms.n_ms, *self.z_src.shape[1:]), 7, round_index)
        if ms.guidance == GLIGEN_BOX and not unguided:
            if self.ms_box is None:
                self.ms_box = self.subject_box()
            # the same DDIM, CFG (scale >= 1) and null prompt as ddim_sample below: equal to it at beta = 0
            return grounded_sample(self.bb, self.ref_prompt, [self.phrase], [self.ms_box], ms.wiring, ms.beta, ms.sampling_steps,
                                   guidance_scale=ms.guidance_scale, scheduler="ddim", num_images=ms.n_ms, latents=noise,
                                   progress=self.progress)
        cond, null = self.encode_ref()
        guidance = None
        if not unguided:
            source_emb = None
            if ms.feature_prompt == "src":
                with self.bb.adapter_disabled():
                    source_emb = self.bb.encode_prompt([self.source_prompt])
            options = {"weight": ms.weight, "start": ms.start, "end": ms.end, "normalize": ms.normalize, "iters": ms.iters,
                       "backtracks": ms.backtracks, "places": tuple(ms.places), "divisors": tuple(ms.divisors), "source_emb": source_emb}
            guidance = make_guidance(ms.guidance, self.bb, self.z_src, noise, cond, options)
        return ddim_sample(self.bb, noise, cond, null, ms.sampling_steps, ms.guidance_scale, guidance, progress=self.progress)

    def _writer(self) -> Any:
        writer = getattr(self.logger, "experiment", None) if self.logger else None
        return writer if writer is not None and hasattr(writer, "add_images") else None

    @torch.no_grad()
    def _images(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.bb.decode(latents).float().clamp(-1, 1) + 1) / 2).cpu()

    def _regenerate(self, round_index: int) -> None:
        start = time.perf_counter()
        self.ms_latents = self.generate_mode_shift(round_index)
        self.ms_rounds += 1
        middle = time.perf_counter()
        self.timings["guided_sampling"] += middle - start
        if self.ms_cfg.log_unguided:  # for comparison only: the same noise without guidance
            self.ms_unguided = self.generate_mode_shift(round_index, unguided=True)
            self.timings["unguided_sampling"] += time.perf_counter() - middle
        writer = self._writer()
        if writer is not None:
            guided = self._images(self.ms_latents)
            writer.add_images("mode_shift/guided", guided, global_step=self.global_step)
            if self.ms_unguided is not None:
                # each pair: guided | unguided from the same initial noise
                pairs = torch.cat([guided, self._images(self.ms_unguided)], dim=-1)
                writer.add_images("mode_shift/guided_vs_unguided", pairs, global_step=self.global_step)

    # ------------------------------------------------------------------ lightning hooks
    def on_fit_start(self) -> None:
        start = time.perf_counter()
        self.subject = self.compute_mask()
        self.timings["mask"] += time.perf_counter() - start
        writer = self._writer()
        if self.subject is not None and writer is not None:
            writer.add_image("mask/binary", self.subject.mask[0].cpu(), 0)
            writer.add_image("mask/soft", self.subject.soft[0].cpu(), 0)
        if self.ms_cfg.lambda_ms > 0:
            self._regenerate(0)

    def train(self, mode: bool = True) -> "DreamSteererModule":
        """Every module stays in eval mode (no dropout): both branches must be the exact models."""
        super().train(False)
        self.training = mode
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        k = self.ms_cfg.regenerate_every
        if self.ms_cfg.lambda_ms > 0 and k > 0 and self.global_step > 0 and self.global_step % k == 0:
            self._regenerate(self.global_step // k)
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.timings["steps"] += time.perf_counter() - self._step_start

    # ------------------------------------------------------------------ the loss
    def draw(self, step: int) -> StepDraw:
        """The step's randomness, seeded by the step index: ``t``, ``eps`` and the mode-shifting rows."""
        cfg, ms = self.edsd_cfg, self.ms_cfg
        gen = self._generator(1, step)
        t = torch.randint(cfg.t_min, cfg.t_max, (1,), generator=gen).to(self.bb.device)
        eps = torch.randn(self.z_src.shape, generator=gen).to(self.bb.device, self.bb.dtype)
        x_ms = t_ms = noise_ms = None
        if ms.lambda_ms > 0 and self.ms_latents is not None:
            z_ms = self.ms_latents
            if 0 < ms.batch_size < z_ms.shape[0]:
                z_ms = z_ms[torch.randperm(z_ms.shape[0], generator=gen)[: ms.batch_size].to(z_ms.device)]
            t_ms = torch.randint(ms.t_min, ms.t_max, (z_ms.shape[0],), generator=gen).to(self.bb.device)
            noise_ms = torch.randn(z_ms.shape, generator=gen).to(self.bb.device, self.bb.dtype)
            x_ms = self.bb.add_noise(z_ms, noise_ms, t_ms)
        return StepDraw(t, eps, self.bb.add_noise(self.z_src, eps, t), x_ms, t_ms, noise_ms)

    def branch_rows(self, cfg_scale: float) -> list[str]:
        """The prompts of a personalized prediction: ``[null, y_ref]`` with CFG, ``[y_ref]`` without."""
        return [NULL, REF] if cfg_scale != 1.0 else [REF]

    def layout(self, draw: StepDraw) -> tuple[list[Row], list[Row]]:
        """The UNet rows of a step with gradient to phi: the personalized branch at ``x_t_src`` plus the
        mode-shifting rows (one call), and the residual rows at ``x_hat_t`` (whose input is set later)."""
        first = [Row(draw.x_t_src, draw.t, prompt) for prompt in self.branch_rows(self.edsd_cfg.guidance_ref)]
        if draw.x_ms is not None:
            first += [Row(draw.x_ms[i:i + 1], draw.t_ms[i:i + 1], REF) for i in range(draw.x_ms.shape[0])]
        residual_scale = self.edsd_cfg.guidance_ref if self.edsd_cfg.residual_cfg else 1.0
        second = [Row(None, draw.t, prompt) for prompt in self.branch_rows(residual_scale)]
        return first, second

    def predict_rows(self, rows: list[Row], x: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call on `rows` (`x` for rows whose input is None), prompts encoded by the personalized
        text encoder here (graph kept to trainable text rows when grad is on)."""
        cond, null = self.encode_ref()
        emb = {REF: cond, NULL: null}
        xs = [row.x if row.x is not None else x for row in rows]
        return self.bb.predict_eps(_cat(xs), _cat([row.t for row in rows]), _cat([emb[row.prompt] for row in rows]))

    def loss_terms(self, draw: StepDraw, first: torch.Tensor, predict_second: Callable[[torch.Tensor], torch.Tensor],
                   mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``L_EDSD + lambda_ms L_ms`` from the outputs of the first call and a function giving the residual
        rows' outputs at ``x_hat_t``; the loss keeps whatever graph those outputs carry."""
        cfg, ms = self.edsd_cfg, self.ms_cfg
        plain_target, cfg_target = self.target_eps(draw.x_t_src, draw.t)
        n_src = len(self.branch_rows(cfg.guidance_ref))
        eps_ref_src = _guided(first[:n_src], cfg.guidance_ref)
        residual_scale = cfg.guidance_ref if cfg.residual_cfg else 1.0

        def predict_ref(x: torch.Tensor) -> torch.Tensor:
            return _guided(predict_second(x), residual_scale)

        target = cfg_target if cfg.residual_cfg else plain_target
        alpha = self.bb.alphas_cumprod[draw.t]
        terms = edsd_loss(eps_ref_src, predict_ref, target, self.z_src, draw.eps, alpha, mask, cfg.eta, cfg.jacobian,
                          cfg.reduction, delta_target=cfg_target)
        result = {"edsd": terms.loss.detach(), "edsd_residual": terms.residual_norm, "delta_norm": terms.delta.detach().pow(2).mean(),
                  "t": draw.t.float()}
        loss = terms.loss
        if draw.x_ms is not None:
            l_ms = denoising_loss(first[n_src:], draw.noise_ms)
            loss = loss + ms.lambda_ms * l_ms
            result["mode_shift"] = l_ms.detach()
        result["loss"] = loss
        return result

    def _mask(self) -> torch.Tensor | None:
        return self.subject.mask.to(self.z_src.dtype) if self.subject is not None else None

    def steering_loss(self, step: int) -> dict[str, torch.Tensor]:
        """``L_EDSD + lambda_ms * L_ms`` for the step's own ``(t, eps)`` in one graph; returns the terms."""
        draw = self.draw(step)
        first_rows, second_rows = self.layout(draw)
        first = self.predict_rows(first_rows)
        return self.loss_terms(draw, first, lambda x: self.predict_rows(second_rows, x), self._mask())

    def accumulate_gradient(self, step: int) -> dict[str, torch.Tensor]:
        """Back-propagate the step's loss into the trainable parameters' ``.grad``; returns the detached terms.

        ``memory.micro_batch = k > 0``: the UNet rows are first evaluated without graph, the loss's gradient
        ``g_i`` with respect to each row's output is taken, then every chunk of at most ``k`` rows is run again
        with graph and back-propagated as ``sum_i <g_i, out_i>`` -- the same gradient (chain rule) with at most
        ``k`` rows of activations alive, for one extra forward pass.
        """
        k = self.memory_cfg.micro_batch
        if k == 0:
            terms = self.steering_loss(step)
            self._backward(terms["loss"])
            return {name: value.detach() for name, value in terms.items()}
        draw = self.draw(step)
        first_rows, second_rows = self.layout(draw)
        with torch.no_grad():
            first = _cat([self.predict_rows(first_rows[i:i + k]) for i in range(0, len(first_rows), k)])
        first = _widened(first).requires_grad_(True)
        seen: dict[str, torch.Tensor] = {}

        def predict_second(x: torch.Tensor) -> torch.Tensor:
            seen["x_hat"] = x.detach()
            with torch.no_grad():
                out = _cat([self.predict_rows(second_rows[i:i + k], seen["x_hat"]) for i in range(0, len(second_rows), k)])
            seen["out"] = _widened(out).requires_grad_(True)
            return seen["out"]

        terms = self.loss_terms(draw, first, predict_second, self._mask())
        grad_first, grad_second = torch.autograd.grad(terms["loss"], [first, seen["out"]], allow_unused=True)
        chunks = [(first_rows, grad_first, None), (second_rows, grad_second, seen["x_hat"])]
        for rows, grad, x in chunks:
            if grad is None:
                continue
            for i in range(0, len(rows), k):
                out = self.predict_rows(rows[i:i + k], x)
                self._backward((_widened(out) * grad[i:i + k]).sum())
        return {name: value.detach() for name, value in terms.items()}

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)  # Lightning's precision plugin (loss scaling under 16-mixed)
        else:
            loss.backward()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        terms = self.accumulate_gradient(int(self.global_step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in terms.items():
            self.log(f"steer/{name}", value.float().mean(), prog_bar=name == "loss", on_step=True, on_epoch=False, batch_size=1)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # called after Lightning unscales 16-mixed gradients
        if self.optim_cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), float(self.optim_cfg.max_grad_norm))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kind = self.bb.adapter.kind
        if kind not in self.optim_cfg.lr:
            raise ValueError(f"config key 'optim.lr.{kind}': no learning rate for adapter kind {kind!r}")
        params = self.trainable_parameters()
        kwargs = dict(lr=float(self.optim_cfg.lr[kind]), betas=tuple(self.optim_cfg.betas), weight_decay=self.optim_cfg.weight_decay)
        if self.optim_cfg.name == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)
