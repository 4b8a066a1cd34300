"""Personalization adapters attached to a Backbone: LoRA, Textual Inversion, Custom Diffusion, DreamBooth.

Each ``add_*`` function changes the backbone in place, stores the adapter object in
``backbone.adapter`` and returns it. Every adapter object offers:

- ``kind``: ``"lora" | "textual_inversion" | "custom_diffusion" | "dreambooth"``;
- ``config``: the keyword arguments that re-create it (``attach_adapter(backbone, kind, **config)``);
- ``tokens``: the placeholder / modifier tokens it added to the tokenizer (may be empty);
- ``base_fingerprint``: ``model_fingerprint`` of the backbone before the adapter was attached;
- ``named_trainable(backbone)``: ``[(name, parameter)]`` with names as the backbone's modules see
  them (``unet.<...>`` / ``text_encoder.<...>`` / on SDXL ``text_encoder_2.<...>``), the trainable state
  of the adapter and nothing else;
- ``trainable_parameters(backbone)``: those parameters, marked ``requires_grad=True``;
- ``set_trainable(backbone, flag)``; ``trainable_state_dict`` / ``load_trainable_state_dict``;
- ``disabled(backbone)``: a context in which the backbone computes exactly the pre-trained model.

Adapters live in module weights, never in attention processors, so the attention recorder of
``distill/attention.py`` (which swaps processors) sees them: peft LoRA layers inside ``to_q/k/v/out``,
Custom Diffusion as trained ``attn2.to_k/to_v`` weights, new token rows inside the token embedding.

Every text-encoder part (LoRA on the text encoder, token rows, DreamBooth's text encoder) applies to each
text encoder of the model's family (SDXL: both), ``backbone.family.text_encoders(backbone)``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import re
from typing import Any, Iterator, Sequence

import torch
from torch import nn

KINDS = ("lora", "textual_inversion", "custom_diffusion", "dreambooth")
LORA_ADAPTER_NAME = "default"
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class AdapterError(ValueError):
    """An adapter that cannot be attached as asked (bad token, second adapter, wrong base model)."""


# ----------------------------------------------------------------------------- fingerprint
_TEXT_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings")
_PROBES_PER_TENSOR = 16


def _probe(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1).float().cpu()
    idx = torch.linspace(0, flat.numel() - 1, _PROBES_PER_TENSOR).round().long()
    return [float(f"{v:.6g}") for v in flat[idx].tolist()]


def model_fingerprint(backbone: Any) -> dict[str, Any]:
    """Identify a base model: a hash of its architecture plus probe values of a few weights.

    ``architecture`` must match exactly; ``probe`` (values from the UNet's ``conv_in`` and time
    embedding and the text encoder's embeddings) is compared with a tolerance, so the same model
    loaded in fp32, fp16 or bf16 matches while a different checkpoint of the same shape does not.
    Call it on a backbone without adapter (adapters change the probed modules' names or values); with pivot words
    it is the fingerprint of the model before they were added.
    """
    if backbone.adapter is not None:
        raise AdapterError("model_fingerprint needs the backbone without adapter (it identifies the base model)")
    if backbone.words is not None:
        return backbone.words.base_fingerprint
    unet_cfg = {k: v for k, v in dict(backbone.unet.config).items() if not k.startswith("_")}
    arch_parts: dict[str, Any] = {"unet": unet_cfg}
    for name, encoder, tokenizer in backbone.family.text_encoders(backbone):
        arch_parts[name] = {k: getattr(encoder.config, k, None) for k in _TEXT_CONFIG_KEYS}
        arch_parts["tokenizer_size" if name == "text_encoder" else f"{name}_tokenizer_size"] = len(tokenizer)
    arch = json.dumps(arch_parts, sort_keys=True, default=str)
    embeddings = backbone.text_encoder.get_input_embeddings().weight
    tensors = [
        backbone.unet.conv_in.weight,
        backbone.unet.time_embedding.linear_1.weight,
        backbone.unet.conv_out.weight,
        getattr(backbone.text_encoder, "text_model", backbone.text_encoder).embeddings.position_embedding.weight,
        embeddings[: min(512, embeddings.shape[0])],
    ]
    for _, encoder, _ in backbone.family.text_encoders(backbone)[1:]:
        tensors.append(encoder.get_input_embeddings().weight[:512])
    return {
        "architecture": hashlib.sha256(arch.encode()).hexdigest(),
        "probe": [v for t in tensors for v in _probe(t)],
    }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any], rtol: float = 2e-2) -> bool:
    """True when two fingerprints name the same base model (probe values within `rtol` of their scale)."""
    if a.get("architecture") != b.get("architecture"):
        return False
    pa, pb = torch.tensor(a.get("probe", [])), torch.tensor(b.get("probe", []))
    if pa.shape != pb.shape:
        return False
    scale = torch.maximum(pa.abs(), pb.abs()).clamp(min=1e-3)
    return bool(((pa - pb).abs() <= rtol * scale).all())


# ----------------------------------------------------------------------------- tokens
class TokenEmbedding(nn.Module):
    """Token embedding table = frozen base rows + trainable rows for added tokens.

    ``E[i] = base.weight[i]`` for ``i < V`` (the base vocabulary) and ``E[i] = new[i - V]`` for the
    added tokens. Only ``new`` is a trainable parameter, so every base row stays bit-exact during
    training (no restore-after-step needed, and the optimizer never holds the 49k-row table).
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.new = nn.Parameter(new_rows.detach().clone())
        self.num_base = base.num_embeddings

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The full table ``[V + n_new, D]`` (a new tensor; for export and inspection)."""
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.num_base - 1))
        is_new = (input_ids >= self.num_base).unsqueeze(-1)
        new = self.new[(input_ids - self.num_base).clamp(min=0, max=self.new.shape[0] - 1)].to(out.dtype)
        return torch.where(is_new, new, out)


def _token_exists(tokenizer: Any, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 or token in tokenizer.get_vocab()


def _single_token_id(tokenizer: Any, token: str, what: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise AdapterError(f"{what} {token!r} must be a single token of the tokenizer, but it splits into {pieces}")
    return ids[0]


def check_new_tokens(tokenizer: Any, tokens: Sequence[str], what: str = "placeholder token") -> None:
    """Raise AdapterError when a token is empty, has spaces, repeats, or already exists in the vocabulary."""
    if not tokens:
        raise AdapterError(f"at least one {what} is needed")
    if len(set(tokens)) != len(tokens):
        raise AdapterError(f"{what}s {list(tokens)} contain a duplicate")
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise AdapterError(f"{what} {token!r} must be non-empty and contain no whitespace")
        if _token_exists(tokenizer, token):
            raise AdapterError(
                f"{what} {token!r} already exists in the tokenizer's vocabulary; choose a new string such as '<{token.strip('<>')}-v1>'"
            )


def _expand_vectors(token: str, num_vectors: int) -> list[str]:
    """diffusers' multi-vector naming: ``tok, tok_1, ..., tok_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _install_token_rows(tokenizer: Any, text_encoder: nn.Module, added: list[str], init_ids: list[int]) -> TokenEmbedding:
    """Add `added` to the tokenizer and a TokenEmbedding whose new rows copy the `init_ids` rows."""
    base = text_encoder.get_input_embeddings()
    if isinstance(base, TokenEmbedding):
        raise AdapterError("the text encoder already has added token rows (one adapter per backbone)")
    if len(tokenizer) != base.num_embeddings:
        raise AdapterError(f"tokenizer size {len(tokenizer)} differs from the text encoder's {base.num_embeddings} embedding rows")
    added_count = tokenizer.add_tokens(added)
    if added_count != len(added):
        raise AdapterError(f"tokens {added} could not all be added to the tokenizer (some already exist)")
    ids = tokenizer.convert_tokens_to_ids(added)
    if ids != list(range(base.num_embeddings, base.num_embeddings + len(added))):
        raise AdapterError(f"tokens {added} got ids {ids}, expected consecutive ids after the base vocabulary")
    rows = base.weight.detach()[torch.tensor(init_ids, device=base.weight.device)].float()
    embedding = TokenEmbedding(base, rows)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def _set_token_rows(text_encoder: nn.Module, rows: torch.Tensor) -> None:
    """Copy `rows` into the added token rows, which must have the same shape."""
    module = _token_module(text_encoder)
    if rows.shape != module.new.shape:
        raise AdapterError(f"token vectors of shape {tuple(rows.shape)} do not fit the text encoder's added rows {tuple(module.new.shape)}")
    with torch.no_grad():
        module.new.copy_(rows.to(module.new.device, module.new.dtype))


def _token_module(text_encoder: nn.Module) -> TokenEmbedding:
    module = text_encoder.get_input_embeddings()
    if not isinstance(module, TokenEmbedding):
        raise AdapterError("the text encoder has no added token rows")
    return module


# ----------------------------------------------------------------------------- base class
class _Adapter:
    """Shared behaviour; subclasses define `kind`, `named_trainable(backbone)` and, where the base
    model differs from the adapted one in the UNet, `disabled(backbone)`."""

    kind: str = ""

    def __init__(self, config: dict[str, Any], base_fingerprint: dict[str, Any], tokens: list[str]):
        self.config = config
        self.base_fingerprint = base_fingerprint
        self.tokens = tokens

    def trainable_parameters(self, backbone: Any) -> list[nn.Parameter]:
        """The adapter's parameters, marked ``requires_grad=True`` (everything else stays frozen)."""
        params = [p for _, p in self.named_trainable(backbone)]
        for p in params:
            p.requires_grad_(True)
        return params

    def set_trainable(self, backbone: Any, trainable: bool) -> None:
        for _, p in self.named_trainable(backbone):
            p.requires_grad_(trainable)

    def trainable_state_dict(self, backbone: Any) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_trainable(backbone)}

    def load_trainable_state_dict(self, backbone: Any, state: dict[str, torch.Tensor]) -> None:
        """Copy values into the trainable parameters; the key sets must match exactly."""
        params = dict(self.named_trainable(backbone))
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise AdapterError(f"{self.kind} state does not match the adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                if p.shape != state[name].shape:
                    raise AdapterError(f"{self.kind} state {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
                p.copy_(state[name].to(p.device, p.dtype))

    def expand_prompt(self, prompt: str) -> str:
        """Write multi-vector tokens out as ``tok tok_1 ...`` (what diffusers' pipelines do)."""
        return prompt

    @contextlib.contextmanager
    def disabled(self, backbone: Any) -> Iterator[None]:
        """The pre-trained model: nothing to switch where the adapter only adds token rows (TI)."""
        yield


def _params_named(module: nn.Module, prefix: str, predicate) -> list[tuple[str, nn.Parameter]]:
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if predicate(n)]


def _text_encoder(backbone: Any, name: str) -> nn.Module:
    """The text encoder called `name` (``text_encoder`` / SDXL's ``text_encoder_2``); AdapterError for another name."""
    encoders = {n: encoder for n, encoder, _ in backbone.family.text_encoders(backbone)}
    if name not in encoders:
        raise AdapterError(f"the model has no text encoder {name!r} (it has {sorted(encoders)})")
    return encoders[name]


def _token_rows_named(backbone: Any) -> list[tuple[str, nn.Parameter]]:
    """The added token rows of every text encoder (``<encoder>.<...>.token_embedding.new``)."""
    named = []
    for name, encoder, _ in backbone.family.text_encoders(backbone):
        _token_module(encoder)
        named += _params_named(encoder, name, lambda n: n.endswith("token_embedding.new"))
    return named


def _add_tokens(backbone: Any, added: list[str], initializers: list[str], what: str) -> None:
    """Add `added` to every tokenizer, each row initialised from its `initializers` token's row in that encoder;
    everything is checked on every tokenizer before any is changed."""
    pairs = backbone.family.text_encoders(backbone)
    init_ids = []
    for _, _, tokenizer in pairs:
        check_new_tokens(tokenizer, added, what)
        init_ids.append([_single_token_id(tokenizer, t, "initializer token") for t in initializers])
    for (_, encoder, tokenizer), ids in zip(pairs, init_ids):
        _install_token_rows(tokenizer, encoder, added, ids)


def _ensure_free(backbone: Any) -> dict[str, Any]:
    if backbone.adapter is not None:
        raise AdapterError(f"the backbone already has a {backbone.adapter.kind} adapter; load a fresh backbone for another one")
    return model_fingerprint(backbone)


def _refuse_new_tokens_on_pivot(backbone: Any, method: str) -> None:
    if backbone.words is not None:
        raise AdapterError(f"{method} adds token rows of its own; it cannot train on pivot words {backbone.words.tokens} "
                           "(pivotal tuning is for LoRA and DreamBooth)")


# ----------------------------------------------------------------------------- LoRA
def check_text_encoder_lora() -> None:
    """Raise AdapterError, before any model is touched, when the installed transformers refuses the installed peft.

    transformers checks ``peft >= MIN_PEFT_VERSION`` in every adapter call on its models (``add_adapter``,
    ``disable_adapters``, ...), so text-encoder LoRA cannot run at all; the UNet side goes through diffusers and
    is unaffected. Known case: transformers >= 5.24 needs peft >= 0.22, which was not released with it.
    """
    from importlib import metadata

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    transformers_version, peft_version = metadata.version("transformers"), metadata.version("peft")
    if Version(peft_version) < Version(MIN_PEFT_VERSION):
        raise AdapterError(
            f"text-encoder LoRA cannot run with transformers {transformers_version} and peft {peft_version}: "
            f"transformers {transformers_version} requires peft >= {MIN_PEFT_VERSION}; fix: install the tested versions "
            f"(pip install -c requirements/lock.txt -e . in a checkout) or peft >= {MIN_PEFT_VERSION} where released"
        )


LORA_VARIANTS = ("lora", "dora", "loha", "lokr")
# the peft parameter names of each variant's layers (``<module>.<name>.default``)
_VARIANT_PARAMS = {
    "lora": ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}


class LoraAdapter(_Adapter):
    """peft LoRA and its variants on the UNet (and optionally every text encoder); per targeted layer ``W``:

    - ``lora``: ``W + (alpha / r) B A`` (Hu et al. 2021), ``A`` Gaussian, ``B = 0`` at attach;
    - ``dora``: ``m * V / ||V||`` with ``V = W + (alpha / r) B A`` and ``||.||`` the norm of each output row
      (Liu et al. 2024), ``m`` starting at ``||W||``;
    - ``loha``: ``W + (alpha / r) (W1a W1b) * (W2a W2b)`` (Hadamard product, LyCORIS), ``W2b = 0`` at attach;
    - ``lokr``: ``W + (alpha / r) kron(W1, W2)`` with ``W1``/``W2`` full or factored as ``a @ b`` (LyCORIS), ``W1 = 0`` at attach.

    So the adapted model starts equal to the base model. Convolutions get the same update on their
    weight flattened to ``[out, in * k * k]``. Disabled: peft's adapter switch (the base layers compute alone).
    """

    kind = "lora"

    @property
    def variant(self) -> str:
        return self.config.get("variant", "lora")

    def named_trainable(self, backbone: Any) -> list[tuple[str, nn.Parameter]]:
        names = _VARIANT_PARAMS[self.variant]
        is_adapter = lambda n: any(f".{name}." in n for name in names)  # noqa: E731
        named = _params_named(backbone.unet, "unet", is_adapter)
        if self.config["text_encoder"]:
            for name, encoder, _ in backbone.family.text_encoders(backbone):
                named += _params_named(encoder, name, is_adapter)
        return named

    @contextlib.contextmanager
    def disabled(self, backbone: Any) -> Iterator[None]:
        modules = [backbone.unet] + (backbone.text_encoders() if self.config["text_encoder"] else [])
        for module in modules:
            module.disable_adapters()
        try:
            yield
        finally:
            for module in modules:
                module.enable_adapters()


def unloadable_lora(variant: str, text_encoder: bool) -> str | None:
    """Why no tool would compute this LoRA variant as trained, or None. DoRA loads in diffusers only (ComfyUI / A1111
    normalize ``dora_scale`` otherwise, see `checkpoints.formats.lora_consumers`), and diffusers 0.42 + transformers 5
    leave a text encoder's DoRA magnitudes unloaded (re-initialized with a "MISSING" warning)."""
    if variant == "dora" and text_encoder:
        return ("DoRA on the text encoder loads in no tool (diffusers 0.42 with transformers 5 does not load its magnitude "
                "vectors; ComfyUI / A1111 do not compute peft's DoRA); train the UNet only, or use variant lora / loha / lokr")
    return None


def targeted_modules(module: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """The submodules peft's ``target_modules`` list selects: a name equal to a target or ending in ``.<target>``."""
    return {name: m for name, m in module.named_modules() if any(name == t or name.endswith("." + t) for t in targets)}


def _pattern_matches(pattern: str, name: str) -> bool:
    """peft's rule for ``rank_pattern`` / ``alpha_pattern`` keys (`peft.utils.other.get_pattern_key`)."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _check_lora_targets(
    unet: nn.Module, target_modules: Sequence[str], conv_target_modules: Sequence[str],
    rank_pattern: dict[str, int], alpha_pattern: dict[str, float],
) -> None:
    """Every conv target names convolutions only, every pattern matches a targeted layer (AdapterError names the key)."""
    for name in conv_target_modules:
        found = targeted_modules(unet, [name])
        if not found:
            raise AdapterError(f"method.conv_target_modules: {name!r} names no module of the UNet (e.g. conv1, conv2, conv_shortcut)")
        linear = sorted(n for n, m in found.items() if not isinstance(m, nn.Conv2d))
        if linear:
            raise AdapterError(f"method.conv_target_modules: {name!r} also names non-convolution layers ({linear[0]}); "
                               "list linear layers in method.target_modules")
    targeted = targeted_modules(unet, [*target_modules, *conv_target_modules])
    for key, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for pattern in patterns:
            if not any(_pattern_matches(pattern, n) for n in targeted):
                raise AdapterError(f"method.{key}: {pattern!r} matches no targeted layer (peft matches the end of the module "
                                   "name, e.g. 'attn2.to_k' or 'down_blocks\\.0\\..*to_q')")


def lora_peft_config(
    variant: str, rank: int, alpha: float, target_modules: Sequence[str], dropout: float,
    rank_pattern: dict[str, int], alpha_pattern: dict[str, float], decompose_both: bool, decompose_factor: int,
) -> Any:
    """peft's own config of the variant: ``LoraConfig`` (``use_dora`` for DoRA), ``LoHaConfig`` or ``LoKrConfig``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = {"r": rank, "target_modules": list(target_modules), "rank_pattern": dict(rank_pattern), "alpha_pattern": dict(alpha_pattern)}
    if variant in ("lora", "dora"):
        return LoraConfig(lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", use_dora=variant == "dora", **common)
    if variant == "loha":
        return LoHaConfig(alpha=alpha, **common)
    return LoKrConfig(alpha=alpha, decompose_both=decompose_both, decompose_factor=decompose_factor, **common)


def add_lora(
    backbone: Any,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = UNET_LORA_TARGETS,
    dropout: float = 0.0,
    text_encoder: bool = False,
    text_target_modules: Sequence[str] = TEXT_LORA_TARGETS,
    variant: str = "lora",
    conv_target_modules: Sequence[str] = (),
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    decompose_both: bool = False,
    decompose_factor: int = -1,
) -> LoraAdapter:
    """Attach peft LoRA / DoRA / LoHa / LoKr layers (`LoraAdapter`) through diffusers' ``unet.add_adapter``.

    ``alpha`` defaults to ``rank`` (scale 1). ``conv_target_modules`` (e.g. the resnets' ``conv1``, ``conv2``,
    ``conv_shortcut``) get ``conv_rank`` / ``conv_alpha`` (defaults: ``rank``, ``conv_rank``), added to the
    patterns after ``rank_pattern`` / ``alpha_pattern`` (``{regex matching the end of a module name: value}``,
    peft's per-module rank / alpha; the first matching key wins). ``decompose_both`` / ``decompose_factor``: LoKr's.
    """
    if variant not in LORA_VARIANTS:
        raise AdapterError(f"method.variant: {variant!r} is not one of {list(LORA_VARIANTS)}")
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    conv_rank = int(rank if conv_rank is None else conv_rank)
    if rank < 1 or conv_rank < 1 or any(int(r) < 1 for r in rank_pattern.values()):
        raise AdapterError(f"LoRA ranks must be >= 1, got rank {rank}, conv_rank {conv_rank}, rank_pattern {rank_pattern}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if dropout and variant in ("loha", "lokr"):
        raise AdapterError(f"method.dropout: peft's {variant} layers have no input dropout; set it to 0")
    if variant != "lokr" and (decompose_both or decompose_factor != -1):
        raise AdapterError(f"method.decompose_both / decompose_factor belong to variant 'lokr', not {variant!r}")
    if not target_modules and not conv_target_modules:
        raise AdapterError("LoRA target_modules must name at least one module (e.g. to_q, to_k, to_v, to_out.0)")
    unloadable = unloadable_lora(variant, text_encoder)
    if unloadable:
        raise AdapterError(f"method.train_text_encoder: {unloadable}")
    if text_encoder:
        check_text_encoder_lora()
    _check_lora_targets(backbone.unet, target_modules, conv_target_modules, rank_pattern, alpha_pattern)
    fingerprint = _ensure_free(backbone)
    alpha = float(rank if alpha is None else alpha)
    conv_alpha = float(conv_rank if conv_alpha is None else conv_alpha)
    config = {
        "rank": int(rank), "alpha": alpha, "target_modules": list(target_modules), "dropout": float(dropout),
        "text_encoder": bool(text_encoder), "text_target_modules": list(text_target_modules), "variant": variant,
        "conv_target_modules": list(conv_target_modules), "conv_rank": conv_rank, "conv_alpha": conv_alpha,
        "rank_pattern": {k: int(v) for k, v in rank_pattern.items()}, "alpha_pattern": {k: float(v) for k, v in alpha_pattern.items()},
        "decompose_both": bool(decompose_both), "decompose_factor": int(decompose_factor),
    }
    # the conv layers' rank / alpha as patterns after the user's (peft takes the first matching key)
    unet_ranks = dict(config["rank_pattern"], **{n: conv_rank for n in conv_target_modules if n not in rank_pattern and conv_rank != rank})
    unet_alphas = dict(config["alpha_pattern"], **{n: conv_alpha for n in conv_target_modules if n not in alpha_pattern and conv_alpha != alpha})
    options = {"variant": variant, "rank": int(rank), "alpha": alpha, "dropout": float(dropout),
               "decompose_both": bool(decompose_both), "decompose_factor": int(decompose_factor)}
    try:
        backbone.unet.add_adapter(
            lora_peft_config(target_modules=[*target_modules, *conv_target_modules], rank_pattern=unet_ranks, alpha_pattern=unet_alphas, **options),
            adapter_name=LORA_ADAPTER_NAME,
        )
        text_patterns = {"rank_pattern": {}, "alpha_pattern": {}}  # the patterns name UNet layers
        for encoder in backbone.text_encoders() if text_encoder else []:
            encoder.add_adapter(
                lora_peft_config(target_modules=list(text_target_modules), **text_patterns, **options), adapter_name=LORA_ADAPTER_NAME,
            )
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise AdapterError(f"LoRA target modules could not be attached: {err}") from err
    adapter = LoraAdapter(config, fingerprint, [])
    backbone.adapter = adapter
    adapter.trainable_parameters(backbone)
    return adapter


# ----------------------------------------------------------------------------- Textual Inversion
class TextualInversionAdapter(_Adapter):
    """Textual Inversion: new token rows ``v_*`` in the text encoder's embedding table, nothing else.

    Each placeholder token owns ``num_vectors`` rows (``tok, tok_1, ...``); prompts are expanded
    to name all of them, as diffusers' pipelines do. With two text encoders (SDXL) each token has its
    own rows in each encoder's table (``[n, D1]`` and ``[n, D2]``), both trained.
    Disabled: nothing to do (the UNet is untouched).
    """

    kind = "textual_inversion"

    def named_trainable(self, backbone: Any) -> list[tuple[str, nn.Parameter]]:
        return _token_rows_named(backbone)

    def vectors(self, backbone: Any, encoder: str = "text_encoder") -> dict[str, torch.Tensor]:
        """{placeholder token: [num_vectors, D]}: the learned rows of text encoder `encoder` (float32 on CPU)."""
        new = _token_module(_text_encoder(backbone, encoder)).new.detach().float().cpu()
        n = self.config["num_vectors"]
        return {tok: new[i * n : (i + 1) * n].clone() for i, tok in enumerate(self.config["tokens"])}

    def set_vectors(self, backbone: Any, vectors: dict[str, torch.Tensor], encoder: str = "text_encoder") -> None:
        n = self.config["num_vectors"]
        rows = []
        for tok in self.config["tokens"]:
            if tok not in vectors:
                raise AdapterError(f"no vectors for token {tok!r}")
            v = vectors[tok].reshape(-1, vectors[tok].shape[-1])
            if v.shape[0] != n:
                raise AdapterError(f"token {tok!r} has {v.shape[0]} vectors, the adapter expects {n}")
            rows.append(v)
        _set_token_rows(_text_encoder(backbone, encoder), torch.cat(rows))

    def expand_prompt(self, prompt: str) -> str:
        n = self.config["num_vectors"]
        if n == 1:
            return prompt
        for tok in self.config["tokens"]:
            prompt = prompt.replace(tok, " ".join(_expand_vectors(tok, n)))
        return prompt


def add_textual_inversion(
    backbone: Any,
    tokens: Sequence[str] | str,
    initializer_token: str = "*",
    num_vectors: int = 1,
) -> TextualInversionAdapter:
    """Add placeholder token(s), each with `num_vectors` rows (in every text encoder) initialised from
    `initializer_token`: one existing token for every row, or several words, row ``i`` of each placeholder
    from word ``i mod n`` (kohya's ``init_word``; "blue circle" with 3 vectors: blue, circle, blue)."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    if num_vectors < 1:
        raise AdapterError(f"num_vectors must be >= 1, got {num_vectors}")
    words = initializer_token.split()
    if not words:
        raise AdapterError("initializer token is empty: name an existing token (or several words) to start the vectors from")
    if len(words) > num_vectors:
        raise AdapterError(f"initializer token {initializer_token!r} has {len(words)} words for {num_vectors} vector(s) per token: "
                           f"set num_vectors to at least {len(words)}, or name fewer words")
    _refuse_new_tokens_on_pivot(backbone, "Textual Inversion")
    for _, _, tokenizer in backbone.family.text_encoders(backbone):
        check_new_tokens(tokenizer, tokens, "placeholder token")
    fingerprint = _ensure_free(backbone)
    added = [name for tok in tokens for name in _expand_vectors(tok, num_vectors)]
    _add_tokens(backbone, added, [words[i % len(words)] for _ in tokens for i in range(num_vectors)], "placeholder token")
    config = {"tokens": tokens, "initializer_token": initializer_token, "num_vectors": int(num_vectors)}
    adapter = TextualInversionAdapter(config, fingerprint, tokens)
    backbone.adapter = adapter
    adapter.trainable_parameters(backbone)
    return adapter


# ----------------------------------------------------------------------------- pivot words
@dataclasses.dataclass
class PivotWords:
    """Textual Inversion words made part of the model's vocabulary, frozen, for a LoRA or DreamBooth to train on
    (pivotal tuning: the word carries what the base model learned from its initializer, the adapter adds the rest).

    Each token owns ``num_vectors`` rows ``tok, tok_1, ...`` appended to every text encoder's embedding table (a
    plain resized ``nn.Embedding``, so a DreamBooth export saves them as part of the model); prompts name ``tok``
    once and are expanded as Textual Inversion's are. `base_fingerprint` identifies the model before the words.
    """

    tokens: list[str]
    num_vectors: int
    initializer_token: str
    base_fingerprint: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The Textual Inversion config that made the words (adapter.json's ``pivot``)."""
        return {"tokens": list(self.tokens), "initializer_token": self.initializer_token, "num_vectors": self.num_vectors}

    def expand_prompt(self, prompt: str) -> str:
        if self.num_vectors == 1:
            return prompt
        for tok in self.tokens:
            prompt = prompt.replace(tok, " ".join(_expand_vectors(tok, self.num_vectors)))
        return prompt

    def vectors(self, backbone: Any, encoder: str = "text_encoder") -> dict[str, torch.Tensor]:
        """{token: [num_vectors, D]}: the words' rows in text encoder `encoder` now (float32 on CPU; a DreamBooth
        that trains the text encoder moves them)."""
        tokenizer = dict((name, tok) for name, _, tok in backbone.family.text_encoders(backbone))[encoder]
        table = _text_encoder(backbone, encoder).get_input_embeddings().weight.detach().float().cpu()
        return {tok: table[tokenizer.convert_tokens_to_ids(_expand_vectors(tok, self.num_vectors))].clone() for tok in self.tokens}


def bake_textual_inversion(backbone: Any) -> PivotWords:
    """Turn the attached Textual Inversion adapter into pivot words: its rows join each text encoder's embedding table
    (``resize_token_embeddings``), the adapter is removed, ``backbone.words`` is set and returned."""
    adapter = backbone.adapter
    if not isinstance(adapter, TextualInversionAdapter):
        raise AdapterError(f"pivot words come from a Textual Inversion adapter, the backbone has {getattr(adapter, 'kind', None)!r}")
    if backbone.words is not None:
        raise AdapterError(f"the backbone already has pivot words {backbone.words.tokens}")
    for _, encoder, tokenizer in backbone.family.text_encoders(backbone):
        module = _token_module(encoder)
        rows = module.new.detach()
        encoder.set_input_embeddings(module.base)
        table = encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            table.weight[module.num_base:] = rows.to(table.weight.device, table.weight.dtype)
        table.weight.requires_grad_(False)
    words = PivotWords(list(adapter.config["tokens"]), int(adapter.config["num_vectors"]), adapter.config["initializer_token"],
                       adapter.base_fingerprint)
    backbone.adapter = None
    backbone.words = words
    return words


# ----------------------------------------------------------------------------- Custom Diffusion
class CustomDiffusionAdapter(_Adapter):
    """Custom Diffusion: fine-tuned cross-attention ``W_k, W_v`` (optionally ``W_q, W_out``) + modifier token rows.

    The trained weights are the ``attn2.to_k/to_v`` Linear weights themselves. Disabled: the
    original weights (kept frozen in the adapter) are swapped into the modules; the trained
    Parameter objects are put back on exit, so graphs built before stay valid.
    With ``detach_sot`` the key/value of the start token get no gradient, as in the paper's code.
    """

    kind = "custom_diffusion"

    def __init__(self, config: dict[str, Any], base_fingerprint: dict[str, Any], tokens: list[str], originals: dict[tuple[str, str], torch.Tensor]):
        super().__init__(config, base_fingerprint, tokens)
        self._originals = originals  # (module path, param name) -> frozen pre-trained tensor

    def weight_names(self) -> list[tuple[str, str]]:
        return list(self._originals)

    def named_trainable(self, backbone: Any) -> list[tuple[str, nn.Parameter]]:
        modules = dict(backbone.unet.named_modules())
        named = [(f"unet.{m}.{p}", modules[m]._parameters[p]) for m, p in self._originals]
        if self.tokens:
            named += _token_rows_named(backbone)
        return named

    def vectors(self, backbone: Any, encoder: str = "text_encoder") -> dict[str, torch.Tensor]:
        """{modifier token: [1, D]}: its learned row in text encoder `encoder` (float32 on CPU)."""
        if not self.tokens:
            return {}
        new = _token_module(_text_encoder(backbone, encoder)).new.detach().float().cpu()
        return {tok: new[i : i + 1].clone() for i, tok in enumerate(self.tokens)}

    def set_vectors(self, backbone: Any, vectors: dict[str, torch.Tensor], encoder: str = "text_encoder") -> None:
        if not self.tokens:
            return
        missing = [tok for tok in self.tokens if tok not in vectors]
        if missing:
            raise AdapterError(f"no vectors for tokens {missing}")
        _set_token_rows(_text_encoder(backbone, encoder), torch.cat([vectors[tok].reshape(1, -1) for tok in self.tokens]))

    @contextlib.contextmanager
    def disabled(self, backbone: Any) -> Iterator[None]:
        modules = dict(backbone.unet.named_modules())
        saved = []
        for key, original in list(self._originals.items()):
            module_name, param_name = key
            module = modules[module_name]
            current = module._parameters[param_name]
            if original.device != current.device:  # follow the model across devices, once
                original = original.to(current.device)
                self._originals[key] = original
            module._parameters[param_name] = nn.Parameter(original, requires_grad=False)
            saved.append((module, param_name, current))
        try:
            yield
        finally:
            for module, param_name, current in saved:
                module._parameters[param_name] = current

    def install_hooks(self, backbone: Any) -> None:
        """Stop gradients through the start token's key/value (values unchanged); called once at attach."""
        if not self.config["detach_sot"]:
            return
        modules = dict(backbone.unet.named_modules())
        for module_name in sorted({m for m, _ in self._originals if m.endswith(("to_k", "to_v"))}):
            modules[module_name].register_forward_hook(_detach_first_token)


def _detach_first_token(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or output.dim() != 3:
        return output
    keep = torch.ones_like(output[:1, :, :1])
    keep[:, 0] = 0.0
    return keep * output + (1 - keep) * output.detach()


def _cross_attention_modules(unet: nn.Module) -> list[str]:
    return [name for name, m in unet.named_modules() if name.endswith("attn2") and hasattr(m, "to_k")]


def add_custom_diffusion(
    backbone: Any,
    modifier_tokens: Sequence[str] | str = ("<new1>",),
    initializer_token: str | Sequence[str] = "*",
    train_q_out: bool = False,
    detach_sot: bool = True,
) -> CustomDiffusionAdapter:
    """Make every cross-attention ``to_k/to_v`` weight (and with `train_q_out` ``to_q``, ``to_out.0``) trainable,
    and add modifier tokens initialised from `initializer_token` (one, or one per modifier token)."""
    _refuse_new_tokens_on_pivot(backbone, "Custom Diffusion")
    tokens = [modifier_tokens] if isinstance(modifier_tokens, str) else list(modifier_tokens)
    inits = [initializer_token] * len(tokens) if isinstance(initializer_token, str) else list(initializer_token)
    if len(inits) != len(tokens):
        raise AdapterError(f"{len(tokens)} modifier tokens but {len(inits)} initializer tokens")
    for _, _, tokenizer in backbone.family.text_encoders(backbone):
        if tokens:
            check_new_tokens(tokenizer, tokens, "modifier token")
        for t in inits:
            _single_token_id(tokenizer, t, "initializer token")
    fingerprint = _ensure_free(backbone)
    attn_names = _cross_attention_modules(backbone.unet)
    if not attn_names:
        raise AdapterError("the UNet has no cross-attention (attn2) modules")
    modules = dict(backbone.unet.named_modules())
    targets = [("to_k", "weight"), ("to_v", "weight")]
    if train_q_out:
        targets += [("to_q", "weight"), ("to_out.0", "weight"), ("to_out.0", "bias")]
    originals: dict[tuple[str, str], torch.Tensor] = {}
    for attn in attn_names:
        for sub, param_name in targets:
            module_name = f"{attn}.{sub}"
            param = modules[module_name]._parameters.get(param_name)
            if param is not None:
                originals[(module_name, param_name)] = param.detach().clone()
    if tokens:
        _add_tokens(backbone, tokens, inits, "modifier token")
    config = {"modifier_tokens": tokens, "initializer_token": inits, "train_q_out": bool(train_q_out), "detach_sot": bool(detach_sot)}
    adapter = CustomDiffusionAdapter(config, fingerprint, tokens, originals)
    adapter.install_hooks(backbone)
    backbone.adapter = adapter
    adapter.trainable_parameters(backbone)
    return adapter


# ----------------------------------------------------------------------------- DreamBooth
class DreamBoothAdapter(_Adapter):
    """DreamBooth: the whole UNet (optionally every text encoder) is trained.

    Disabled: a frozen copy of the base UNet (and text encoders) taken at attach time is swapped
    into the backbone; needs ``keep_base=True`` (it costs one extra UNet in memory).
    Note: a module reference taken before entering the context (an attention recorder on
    ``backbone.unet``) still points to the trained UNet.
    """

    kind = "dreambooth"

    def __init__(self, config: dict[str, Any], base_fingerprint: dict[str, Any], base_unet: nn.Module | None,
                 base_text_encoders: dict[str, nn.Module] | None = None):
        super().__init__(config, base_fingerprint, [])
        self.base_unet = base_unet
        self.base_text_encoders = base_text_encoders or {}  # {"text_encoder": module, ...} when they are trained

    def named_trainable(self, backbone: Any) -> list[tuple[str, nn.Parameter]]:
        named = _params_named(backbone.unet, "unet", lambda n: True)
        if self.config["train_text_encoder"]:
            for name, encoder, _ in backbone.family.text_encoders(backbone):
                named += _params_named(encoder, name, lambda n: True)
        return named

    @contextlib.contextmanager
    def disabled(self, backbone: Any) -> Iterator[None]:
        if self.base_unet is None:
            raise AdapterError("this DreamBooth adapter was attached with keep_base=False: no base UNet to switch to")
        unet = backbone.unet
        trained = {name: getattr(backbone, name) for name in self.base_text_encoders}
        self.base_unet.to(unet.device)
        backbone.unet = self.base_unet
        for name, base in self.base_text_encoders.items():
            setattr(backbone, name, base.to(trained[name].device))
        try:
            yield
        finally:
            backbone.unet = unet
            for name, module in trained.items():
                setattr(backbone, name, module)


def _frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    clone.eval()
    return clone


def add_dreambooth(backbone: Any, train_text_encoder: bool = False, keep_base: bool = True) -> DreamBoothAdapter:
    """Mark the UNet (and optionally every text encoder) trainable; keep frozen base copies when `keep_base`."""
    fingerprint = _ensure_free(backbone)
    base_unet = _frozen_copy(backbone.unet) if keep_base else None
    base_text = {name: _frozen_copy(encoder) for name, encoder, _ in backbone.family.text_encoders(backbone)} if keep_base and train_text_encoder else {}
    config = {"train_text_encoder": bool(train_text_encoder), "keep_base": bool(keep_base)}
    adapter = DreamBoothAdapter(config, fingerprint, base_unet, base_text)
    backbone.adapter = adapter
    adapter.trainable_parameters(backbone)
    return adapter


# ----------------------------------------------------------------------------- generic
_ATTACH = {
    "lora": add_lora,
    "textual_inversion": add_textual_inversion,
    "custom_diffusion": add_custom_diffusion,
    "dreambooth": add_dreambooth,
}


def config_keys(kind: str) -> set[str]:
    """The keyword arguments `attach_adapter` takes for `kind` (the keys of its adapter config)."""
    import inspect

    if kind not in _ATTACH:
        raise AdapterError(f"unknown adapter kind {kind!r}: expected one of {list(KINDS)}")
    return set(inspect.signature(_ATTACH[kind]).parameters) - {"backbone"}


def attach_adapter(backbone: Any, kind: str, **config: Any) -> _Adapter:
    """Attach an adapter of `kind` with the keyword arguments of its ``add_*`` function."""
    if kind not in _ATTACH:
        raise AdapterError(f"unknown adapter kind {kind!r}: expected one of {list(KINDS)}")
    return _ATTACH[kind](backbone, **config)
