"""One loader for every model source, and the Backbone that holds the loaded components.

Sources accepted by `load_backbone`:
- ``"tiny"`` or ``"tiny:<seed>"``: the built-in tiny model (built once, then loaded from its folder);
- ``"tiny-gligen"`` or ``"tiny-gligen:<seed>"``: the tiny model plus GLIGEN's gated layers (`diffusion.gligen`);
- ``"tiny-sdxl"`` or ``"tiny-sdxl:<seed>"``: the built-in tiny SDXL-shaped model (`diffusion.tiny`);
- ``"toy"``: the toy model trained on the toy world, and ``"toy-gligen"``, a GLIGEN model of the same
  world, both shipped in `diffusion/builtin/` (`diffusion.toy`; fp16 files, loaded in the dtype asked for
  like any folder);
- a local diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ...) of a
  ``StableDiffusionPipeline`` (SD 1.x/2.x) or a ``StableDiffusionXLPipeline`` (SDXL);
- a single ``.safetensors`` checkpoint (A1111/ComfyUI style, SD 1.x/2.x or SDXL; needs its diffusers config
  locally or a hub);
- a hub id ``owner/name`` (only where a model hub is reachable).

The model family (`diffusion.family`) decides how prompts are encoded and how the UNet is conditioned.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from dreamsteer.diffusion.family import Family, family_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_COMPONENTS = _COMPONENTS + ("text_encoder_2", "tokenizer_2")
_SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # text encoder 2 (OpenCLIP ViT-bigG) in SDXL's original layout


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's context (77 tokens for CLIP): the tokens past it are ignored."""


_CHECKED_PROMPTS: set[tuple[int, str]] = set()  # (token limit, prompt): each prompt is measured (and warned about) once


def warn_if_truncated(tokenizer: Any, prompts: Sequence[str], expanded: Sequence[str]) -> None:
    """Warn once per prompt whose tokens (of its `expanded` form, e.g. multi-vector TI) exceed the tokenizer's limit."""
    limit = int(tokenizer.model_max_length)
    for prompt, text in zip(prompts, expanded):
        if (limit, prompt) in _CHECKED_PROMPTS:
            continue
        _CHECKED_PROMPTS.add((limit, prompt))
        length = len(tokenizer(text, truncation=False, verbose=False).input_ids)  # with the start/end tokens
        if length > limit:
            warnings.warn(f"prompt {prompt!r} is {length} tokens long; the text encoder reads only the first {limit} "
                          "(the rest is ignored)", PromptTruncatedWarning, stacklevel=3)


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names the source and what is wrong."""


class Adapter(Protocol):
    """What an attached adapter (LoRA, TI, Custom Diffusion, DreamBooth) offers the backbone."""

    kind: str

    def disabled(self, backbone: "Backbone") -> contextlib.AbstractContextManager[None]:
        """Context in which the backbone computes exactly what the pre-trained model computes."""
        ...


@dataclass
class Backbone:
    """The components of a Stable-Diffusion-style model plus the operations every task needs.

    Latents follow SD's convention: ``z = scaling_factor * vae.encode(x).mean`` for images
    ``x`` in [-1, 1]; the forward process is ``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` with
    ``a_t`` the scheduler's ``alphas_cumprod``. A prompt's conditioning is one tensor whose layout
    the model's `family` defines (SD: the text encoder's hidden states; SDXL: both encoders' hidden
    states plus the pooled embedding as a last row); `predict_eps` turns it into the UNet's inputs.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str
    adapter: Adapter | None = field(default=None)
    words: Any = field(default=None)  # `diffusion.adapters.PivotWords`: Textual Inversion words in the vocabulary (pivotal tuning)
    sampling_scheduler: Any = field(default=None)  # the model's own scheduler (class and config), kept for exports
    text_encoder_2: Any = field(default=None)  # SDXL's second text encoder (CLIPTextModelWithProjection) and tokenizer
    tokenizer_2: Any = field(default=None)
    family: Family = field(default=None)  # type: ignore[assignment]  # from the components when not given

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = family_of(self.unet, self.text_encoder_2, self.vae)

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was trained at (pixels)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Backbone":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in self.modules():
            module.to(**kwargs)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The UNet, the VAE and every text encoder."""
        return [self.unet, self.vae] + self.text_encoders()

    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders of the model's family (SD: one; SDXL: two), in the diffusers folder's order."""
        return [encoder for _, encoder, _ in self.family.text_encoders(self)]

    def freeze(self) -> "Backbone":
        """Put every component in eval mode with gradients off (trainers re-enable what they train)."""
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()
        return self

    # ----------------------------------------------------------------- text
    def tokenize(self, prompts: Sequence[str], tokenizer: Any = None) -> torch.Tensor:
        """Token ids padded/truncated to the tokenizer's max length, on the model's device
        (every prompt of every task is tokenized here: a truncated one is warned about once).
        `tokenizer`: another of the model's tokenizers (SDXL's ``tokenizer_2``); default ``tokenizer``."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        prompts = list(prompts)
        expanded = [self.expand_prompt(p) for p in prompts]
        warn_if_truncated(tokenizer, prompts, expanded)
        ids = tokenizer(
            expanded,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.text_encoder.device)

    def expand_prompt(self, prompt: str) -> str:
        """The prompt as the tokenizer sees it: multi-vector words (pivot words, then the adapter's Textual Inversion
        or Custom Diffusion tokens) written out as "<tok> <tok>_1 ...", as diffusers' pipelines do."""
        if self.words is not None:
            prompt = self.words.expand_prompt(prompt)
        if self.adapter is not None and hasattr(self.adapter, "expand_prompt"):
            prompt = self.adapter.expand_prompt(prompt)
        return prompt

    def encode_prompt(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """The prompts' conditioning, one tensor ``[B, L, D]`` in the family's layout (`diffusion.family`):
        SD 1.x/2.x: the last hidden state. Token ids (a tensor) are accepted on SD 1.x/2.x only."""
        if isinstance(prompts, torch.Tensor):
            if self.family.name != "sd":
                raise TypeError(f"encode_prompt: token ids cannot be encoded by a {self.family.name} model (two tokenizers); pass the prompts")
            return self.text_encoder(prompts)[0]
        return self.family.encode(self, prompts)

    # ----------------------------------------------------------------- images
    def encode_image(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]; the posterior mean unless `sample` is set."""
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    # ----------------------------------------------------------------- diffusion
    def add_noise(self, z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` with `t` of shape [B] or a scalar."""
        a = self.alphas_cumprod[t.to(self.device).long()].reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)
        return a.sqrt() * z + (1 - a).sqrt() * eps

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, time_ids: torch.Tensor | None = None,
                    **unet_kwargs: Any) -> torch.Tensor:
        """The UNet's noise prediction, converted from v-prediction where the model uses it. `text_emb` is a
        conditioning from `encode_prompt`; `time_ids` (SDXL, ``[B, 6]`` or ``[6]``) default to the latents' size."""
        t = t.to(self.device).reshape(-1).expand(z_t.shape[0])  # a scalar t applies to the whole batch
        hidden, added = self.family.unet_inputs(text_emb.to(self.dtype), z_t, time_ids)
        out = self.unet(z_t.to(self.dtype), t, encoder_hidden_states=hidden, **added, **unet_kwargs).sample
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1).to(out.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * z_t.to(out.dtype)
        return out

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside this context the backbone is the pre-trained model (a no-op without an adapter)."""
        if self.adapter is None:
            yield
        else:
            with self.adapter.disabled(self):
                yield

    def pipeline(self, scheduler: Any | None = None):
        """The family's diffusers pipeline (StableDiffusionPipeline / StableDiffusionXLPipeline) sharing this
        backbone's modules (no copies). Pass it prompts as ``**backbone.pipeline_prompt_kwargs(cond, uncond)``."""
        import diffusers

        scheduler = scheduler if scheduler is not None else self.scheduler
        parts = dict(vae=self.vae, unet=self.unet, scheduler=scheduler)
        for name, encoder, tokenizer in self.family.text_encoders(self):
            parts[name] = encoder
            parts[name.replace("text_encoder", "tokenizer")] = tokenizer
        if self.family.name == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=self.family.zero_empty_prompt,
                                                      add_watermarker=False)
        else:
            pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_prompt_kwargs(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` (and SDXL's ``pooled_prompt_embeds``, negatives where `uncond` is given) for `pipeline`."""
        return self.family.pipeline_prompt_kwargs(cond, uncond)


def set_progress_bars(enabled: bool) -> None:
    """The libraries' own bars (diffusers / transformers model loading) on or off for this process; the
    tasks pass their ``progress`` setting to their own bars and to Lightning's."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        (library.enable_progress_bar if enabled else library.disable_progress_bar)()


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of diffusers' `from_pretrained` / `from_single_file`: `dtype` from diffusers 0.40 on (which
    warns on every load given the old name), `torch_dtype` before it (which knows no other)."""
    import diffusers

    major, minor = (int(part) for part in re.findall(r"\d+", diffusers.__version__)[:2])
    return {"dtype" if (major, minor) >= (0, 40) else "torch_dtype": dtype}


def resolve_model_source(source: str, cache_dir: str | Path | None = None) -> str:
    """Turn a built-in name (``tiny``, ``tiny-gligen``, ``tiny-sdxl``, optionally ``:<seed>``; ``toy``,
    ``toy-gligen``) into its folder, building a tiny one once; other sources pass unchanged."""
    from dreamsteer.diffusion.toy import BUILTIN_MODELS, builtin_model_dir

    if source in BUILTIN_MODELS:
        return str(builtin_model_dir(source))
    name, _, seed_text = source.partition(":")
    if name not in ("tiny", "tiny-gligen", "tiny-sdxl"):
        return source
    seed_text = seed_text or "0"
    if not seed_text.isdigit():
        raise ModelLoadError(f"model '{source}': the seed after '{name}:' must be a non-negative integer")
    if name == "tiny":
        from dreamsteer.diffusion.tiny import tiny_model_dir as build
    elif name == "tiny-sdxl":
        from dreamsteer.diffusion.tiny import tiny_sdxl_model_dir as build
    else:  # the tiny model plus GLIGEN's gated layers
        from dreamsteer.diffusion.gligen import tiny_gligen_dir as build
    return str(build(int(seed_text), cache_dir))


def load_backbone(
    source: str,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    single_file_config: str | None = None,
) -> Backbone:
    """Load a Backbone from `source` (see module docstring); every component frozen, in eval mode."""
    torch_dtype = parse_dtype(dtype)
    resolved = resolve_model_source(str(source), cache_dir)
    path = Path(resolved).expanduser()
    looks_like_path = path.exists() or resolved.startswith((".", "/", "~")) or path.suffix in {".safetensors", ".ckpt", ".bin", ".pt"}

    if path.is_dir():
        pipeline_class = _pipeline_class(_folder_config(path))
        _check_diffusers_folder(path, _SDXL_COMPONENTS if pipeline_class.__name__ == "StableDiffusionXLPipeline" else _COMPONENTS)
        try:
            pipe = pipeline_class.from_pretrained(path, **dtype_kwargs(torch_dtype), local_files_only=True, **_extra_kwargs(pipeline_class))
        except Exception as err:  # diffusers raises many types here; name the folder in one message
            raise ModelLoadError(f"model folder {path}: could not be loaded as a diffusers pipeline: {err}") from err
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"model file {path}: only .safetensors single-file checkpoints are accepted (pickled .ckpt/.bin files can run code)")
        pipeline_class = _single_file_class(path)
        local_config = single_file_config is not None and Path(single_file_config).expanduser().is_dir()
        try:  # with a local config folder nothing needs a hub: never ask one
            pipe = pipeline_class.from_single_file(path, **dtype_kwargs(torch_dtype), config=single_file_config, local_files_only=local_config,
                                                   **_extra_kwargs(pipeline_class))
        except Exception as err:
            raise ModelLoadError(
                f"model file {path}: could not be loaded as a single-file {pipeline_class.__name__} checkpoint ({err}). It needs its "
                "diffusers config: pass model.single_file_config=<local diffusers folder of the same architecture> where no hub is reachable"
            ) from err
    elif looks_like_path:
        raise ModelLoadError(f"model path {path} does not exist")
    elif _HUB_ID.match(resolved):
        try:
            pipeline_class = _pipeline_class(_hub_config(resolved))
            pipe = pipeline_class.from_pretrained(resolved, **dtype_kwargs(torch_dtype), **_extra_kwargs(pipeline_class))
        except Exception as err:
            raise ModelLoadError(
                f"hub model {resolved!r} could not be loaded ({type(err).__name__}: {err}). "
                "Is a model hub reachable? Otherwise download it elsewhere and pass the local folder."
            ) from err
    else:
        raise ModelLoadError(
            f"unknown model {resolved!r}: expected 'tiny', 'tiny-sdxl', 'toy', 'toy-gligen', a local diffusers folder, a .safetensors file, "
            "or a hub id 'owner/name'"
        )

    sdxl = dict(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2) if hasattr(pipe, "text_encoder_2") else {}
    try:
        family = family_of(pipe.unet, sdxl.get("text_encoder_2"), pipe.vae,
                           bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True)))
    except ValueError as err:
        raise ModelLoadError(f"model {source}: {err}") from err
    if family.name == "sdxl" and torch_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        warnings.warn(f"model {source}: SDXL's VAE overflows in fp16 (NaN images); use model.dtype=bf16 or a VAE fixed "
                      "for fp16 (madebyollin/sdxl-vae-fp16-fix, whose config has force_upcast=false)", stacklevel=2)
    backbone = Backbone(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=_training_scheduler(pipe.scheduler),
        source=str(source),
        sampling_scheduler=pipe.scheduler,
        family=family,
        **sdxl,
    )
    return backbone.to(device).freeze()


def _pipeline_class(model_index: dict[str, Any]):
    """The diffusers pipeline class to load a ``model_index.json`` with: StableDiffusionXLPipeline for SDXL
    pipelines (``StableDiffusionXL*``), StableDiffusionPipeline for everything else (SD 1.x/2.x, GLIGEN)."""
    import diffusers

    name = str(model_index.get("_class_name", ""))
    return diffusers.StableDiffusionXLPipeline if name.startswith("StableDiffusionXL") else diffusers.StableDiffusionPipeline


def _extra_kwargs(pipeline_class: Any) -> dict[str, Any]:
    return {} if pipeline_class.__name__ == "StableDiffusionXLPipeline" else {"safety_checker": None}


def _folder_config(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"model folder {path} is not a diffusers folder: it has no model_index.json")
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model folder {path}: model_index.json is not readable JSON ({err})") from err


def _hub_config(hub_id: str) -> dict[str, Any]:
    """The hub model's ``model_index.json`` (fetched by diffusers; raises where no hub is reachable)."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(hub_id))


def _single_file_class(path: Path):
    """StableDiffusionXLPipeline for a checkpoint holding SDXL's second text encoder, else StableDiffusionPipeline."""
    import diffusers
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            sdxl = any(key.startswith(_SDXL_SINGLE_FILE_KEY) for key in handle.keys())
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"model file {path}: not a readable safetensors file ({err})") from err
    return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline


def _check_diffusers_folder(path: Path, components: Sequence[str]) -> None:
    missing = [name for name in components if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {path} is not a complete diffusers folder: missing {', '.join(m + '/' for m in missing)}")


def _training_scheduler(scheduler: Any):
    """A DDPMScheduler with the model's noise schedule (training and score distillation use it)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)
