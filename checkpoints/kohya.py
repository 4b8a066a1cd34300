"""The kohya / A1111 / ComfyUI LoRA file: key names, the metadata kohya's sd-scripts write, its hashes.

Keys: ``lora_unet_<diffusers module path with _>`` and ``lora_te_text_model_<CLIP module path
with _>`` (SD 1.x/2.x), each with ``.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r] and
``.alpha``; the update is ``W += (alpha / r) * up @ down``. SDXL (what kohya's ``sdxl_train_network.py``
writes): UNet modules in the original SGM names, ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
(`sd_single_file.original_unet_module`), the text encoders ``lora_te1_text_model_...`` (CLIP ViT-L) and
``lora_te2_text_model_...`` (OpenCLIP ViT-bigG, in Hugging Face CLIP names).

Metadata (read by A1111's and ComfyUI's LoRA browsers): ``ss_network_module``, ``ss_network_dim``,
``ss_network_alpha``, ``ss_base_model_version`` (``sd_v1`` / ``sd_v2``, ``_v`` for v-prediction;
``sdxl_base_v1-0`` for SDXL, which A1111 reads to list the LoRA for SDXL models),
``ss_v2`` (A1111 hides a LoRA whose ``ss_v2`` disagrees with the loaded model), ``ss_sd_model_name``,
``ss_output_name``, ``ss_resolution``, ``ss_steps``, ``ss_tag_frequency`` (when captions were used),
and the precomputed hashes, as kohya computes them over the file written with only the ``ss_*``
metadata: ``sshs_model_hash`` = sha256 of the bytes after the header (A1111's "addnet" hash),
``sshs_legacy_hash`` = first 8 hex digits of sha256 of the 64 KiB at offset 1 MiB.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterable

import torch

from dreamsteer.checkpoints.safetensors_files import serialize

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
SDXL_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
NETWORK_MODULE = "networks.lora"


class KohyaFormatError(ValueError):
    """A kohya LoRA file that cannot be mapped onto the model."""


def is_sd2(text_encoder_config: Any) -> bool:
    """SD 2.x uses OpenCLIP ViT-H (``gelu``); SD 1.x OpenAI CLIP ViT-L (``quick_gelu``)."""
    return getattr(text_encoder_config, "hidden_act", "quick_gelu") == "gelu"


def base_model_version(v2: bool, v_prediction: bool, sdxl: bool = False) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1`` / ``sd_v2``, plus ``_v`` for v-prediction; SDXL: ``sdxl_base_v1-0``
    (kohya records SDXL v-prediction in ``ss_v_parameterization`` only)."""
    if sdxl:
        return SDXL_BASE_MODEL_VERSION
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else "")


def peft_to_kohya(state: dict[str, torch.Tensor], prefix: str, alphas: dict[str, float] | float, text_encoder: bool) -> dict[str, torch.Tensor]:
    """peft keys ``<module>.lora_A.weight`` / ``lora_B`` -> kohya ``<prefix><module_>.lora_down`` / ``lora_up`` + ``.alpha``.

    `alphas` is one alpha for every module or ``{module: alpha}``. Text-encoder modules are named
    with ``text_model.`` (transformers 5 dropped that wrapper; kohya names keep it). SDXL UNet states come
    with their module names already in the SGM layout (`sdxl_unet_rename`).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            raise KohyaFormatError(f"unexpected LoRA key {key!r} (only linear LoRA layers convert to kohya)")
        alpha = alphas[module] if isinstance(alphas, dict) else alphas
        if text_encoder and not module.startswith("text_model."):
            module = "text_model." + module
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if rest[0] == 'A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def sdxl_unet_rename(unet_config: Any) -> Callable[[str], str]:
    """diffusers UNet module name -> the SGM name kohya uses in SDXL LoRA keys."""
    from dreamsteer.checkpoints.sd_single_file import original_unet_module

    return lambda module: original_unet_module(module, unet_config)


def kohya_to_peft(state: dict[str, torch.Tensor], unet_modules: Iterable[str], text_modules: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """kohya keys -> peft ``<module>.lora_A.weight`` / ``lora_B`` for the UNet and the text encoder.

    Module names are found among the model's own (`unet_modules`, `text_modules`: names as
    ``named_modules`` gives them), since ``_`` in a kohya name may stand for ``.`` or ``_``.
    Each module's ``alpha / rank`` is folded into its ``lora_B`` so the result needs scale 1
    (``lora_alpha = rank``). Convolution LoRAs keep their 4-d shapes. Raises `KohyaFormatError` naming the first key that maps nowhere.
    """
    text_modules = [m if m.startswith("text_model.") else "text_model." + m for m in text_modules]
    lookup = {UNET_PREFIX + m.replace(".", "_"): ("unet", m) for m in unet_modules}
    lookup.update({TEXT_PREFIX + m.replace(".", "_"): ("text_encoder", m) for m in text_modules})
    names = sorted({k.split(".", 1)[0] for k in state})
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for name in names:
        if name not in lookup:
            raise KohyaFormatError(f"kohya key {name!r} names no module of this model (SD 1.x/2.x LoRA on the UNet / text encoder expected)")
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise KohyaFormatError(f"kohya module {name!r}: needs both lora_down.weight and lora_up.weight")
        rank = down.shape[0]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
        part, module = lookup[name]
        out[part][f"{module}.lora_A.weight"] = down
        out[part][f"{module}.lora_B.weight"] = up * (alpha / rank)
    return out["unet"], out["text_encoder"]


def tag_frequency(captions: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset folder, how many captions contain each comma-separated tag."""
    result = {}
    for folder, texts in captions.items():
        counts: dict[str, int] = {}
        for text in texts:
            for tag in (t.strip() for t in text.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        result[folder] = counts
    return result


def addnet_hashes(file_bytes: bytes) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of a serialized safetensors file, as kohya computes them."""
    header = int.from_bytes(file_bytes[:8], "little")
    model_hash = hashlib.sha256(file_bytes[8 + header :]).hexdigest()
    legacy_hash = hashlib.sha256(file_bytes[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def lora_metadata(
    tensors: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    v2: bool,
    v_prediction: bool,
    base_model: str,
    output_name: str,
    resolution: int | None,
    steps: int | None,
    tag_frequency_json: dict[str, dict[str, int]] | None = None,
    network: dict[str, str] | None = None,
    sdxl: bool = False,
) -> dict[str, str]:
    """The metadata kohya's ``train_network.py`` (``sdxl_train_network.py`` with `sdxl`) writes, with its two hashes of
    `tensors`; `network` replaces ``ss_network_module`` / adds ``ss_network_args`` (LyCORIS, convolutions:
    `checkpoints.lycoris.network_metadata`)."""
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": base_model_version(v2, v_prediction, sdxl),
        "ss_v2": str(bool(v2)),
        "ss_v_parameterization": str(bool(v_prediction)),
        "ss_sd_model_name": base_model,
        "ss_output_name": output_name,
        **(network or {}),
    }
    if resolution:
        meta["ss_resolution"] = str((int(resolution), int(resolution)))
    if steps is not None:
        meta["ss_steps"] = str(int(steps))
    if tag_frequency_json:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency_json, sort_keys=True)
    # kohya hashes the file as written with only the training metadata (the ss_* keys)
    model_hash, legacy_hash = addnet_hashes(serialize(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")}))
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    return meta
