"""Weight formats of each adapter kind: writers into an export folder and readers back onto a backbone.

| kind | files | loads with |
|---|---|---|
| lora | ``pytorch_lora_weights.safetensors`` (diffusers, with the LoraConfig as metadata); ``lora_kohya.safetensors`` on request | ``pipe.load_lora_weights(dir)``; A1111 / ComfyUI / kohya read the kohya file |
| textual_inversion | ``learned_embeds.safetensors`` ``{token: [n, D]}`` (one file per placeholder token: ``learned_embeds_<i>.safetensors`` after the first); ``a1111/<name>.safetensors`` ``{"emb_params": [n, D]}`` on request | ``pipe.load_textual_inversion(dir)``; A1111 ``embeddings/`` |
| custom_diffusion | ``pytorch_custom_diffusion_weights.safetensors`` (diffusers' ``save_attn_procs`` keys) + ``learned_embeds*.safetensors`` for the modifier tokens | ``load_adapter`` (our loader), or diffusers' CustomDiffusionAttnProcessor built from the file |
| dreambooth | a complete diffusers pipeline folder (the export folder itself) | ``StableDiffusionPipeline.from_pretrained(dir)``; ``model=local model.pretrained=dir`` |
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_KOHYA_FILE = "lora_kohya.safetensors"
CD_FILE = "pytorch_custom_diffusion_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"
A1111_DIR = "a1111"


class AdapterFormatError(ValueError):
    """An adapter file whose content does not fit the adapter it should fill."""


def token_file_name(index: int) -> str:
    return TI_FILE if index == 0 else f"learned_embeds_{index}.safetensors"


def a1111_name(token: str) -> str:
    """A file stem A1111 users can type as the trigger word: the token without brackets and odd characters."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", token.strip("<>")) or "embedding"
    return stem


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


# ----------------------------------------------------------------------------- LoRA
def _peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    return get_peft_model_state_dict(module, adapter_name=LORA_ADAPTER_NAME)


def peft_to_kohya(state: dict[str, torch.Tensor], prefix: str, alpha: float, text_encoder: bool) -> dict[str, torch.Tensor]:
    """peft keys ``<module>.lora_A.weight`` -> kohya ``<prefix><module_with_underscores>.lora_down.weight`` + ``.alpha``.

    SD 1.x/2.x kohya names: ``lora_unet_<diffusers module path>`` and
    ``lora_te_text_model_<HF CLIP module path>``; the scale is ``alpha / rank``, stored per module.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            raise AdapterFormatError(f"unexpected LoRA key {key!r} (only linear LoRA layers convert to kohya)")
        if text_encoder and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 dropped the text_model wrapper; kohya names keep it
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if rest[0] == 'A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_lora(adapter: Any, backbone: Any, directory: Path, a1111: bool) -> list[str]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    unet_state = {k: v.detach().float().cpu() for k, v in _peft_state(backbone.unet).items()}
    text_state = {k: v.detach().float().cpu() for k, v in _peft_state(backbone.text_encoder).items()} if adapter.config["text_encoder"] else {}
    StableDiffusionPipeline.save_lora_weights(
        str(directory),
        unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state) if text_state else None,
        unet_lora_adapter_metadata=backbone.unet.peft_config[LORA_ADAPTER_NAME].to_dict(),
        text_encoder_lora_adapter_metadata=backbone.text_encoder.peft_config[LORA_ADAPTER_NAME].to_dict() if text_state else None,
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    files = [LORA_FILE]
    if a1111:
        alpha = adapter.config["alpha"]
        kohya = peft_to_kohya(unet_state, "lora_unet_", alpha, text_encoder=False)
        kohya.update(peft_to_kohya(text_state, "lora_te_", alpha, text_encoder=True))
        _save(kohya, directory / LORA_KOHYA_FILE, {"ss_network_dim": str(adapter.config["rank"]), "ss_network_alpha": str(alpha)})
        files.append(LORA_KOHYA_FILE)
    return files


def _diffusers_to_peft_key(key: str) -> str:
    """diffusers' saved names (``lora.down``, ``lora_linear_layer.down``) -> peft's ``lora_A`` / ``lora_B``."""
    for old in (".lora.", ".lora_linear_layer."):
        key = key.replace(f"{old}down.", ".lora_A.").replace(f"{old}up.", ".lora_B.")
    return key


def read_lora(adapter: Any, backbone: Any, directory: Path) -> None:
    """Fill the attached LoRA layers from the diffusers file (keys ``unet.``/``text_encoder.`` + peft or diffusers names)."""
    from peft.utils import set_peft_model_state_dict

    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    state = load_file(str(directory / LORA_FILE))
    for prefix, module in (("unet.", backbone.unet), ("text_encoder.", backbone.text_encoder)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        part = {_diffusers_to_peft_key(k): v for k, v in part.items()}
        expected = set(_peft_state(module))
        if set(part) != expected:
            raise AdapterFormatError(
                f"{directory / LORA_FILE}: {prefix[:-1]} LoRA keys do not match the adapter config "
                f"(missing {sorted(expected - set(part))[:3]}, unexpected {sorted(set(part) - expected)[:3]})"
            )
        result = set_peft_model_state_dict(module, part, adapter_name=LORA_ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise AdapterFormatError(f"{directory / LORA_FILE}: unexpected keys {result.unexpected_keys[:3]}")


# ----------------------------------------------------------------------------- token embeddings (TI, CD)
def write_token_files(vectors: dict[str, torch.Tensor], directory: Path, a1111: bool) -> tuple[list[str], dict[str, str]]:
    files, token_files = [], {}
    for i, (token, rows) in enumerate(vectors.items()):
        name = token_file_name(i)
        _save({token: rows.float()}, directory / name)
        files.append(name)
        token_files[token] = name
        if a1111:
            (directory / A1111_DIR).mkdir(exist_ok=True)
            a_name = f"{A1111_DIR}/{a1111_name(token)}.safetensors"
            _save({"emb_params": rows.float()}, directory / a_name)
            files.append(a_name)
    return files, token_files


def read_token_files(directory: Path, token_files: dict[str, str]) -> dict[str, torch.Tensor]:
    vectors = {}
    for token, name in token_files.items():
        state = load_file(str(directory / name))
        if list(state) != [token]:
            raise AdapterFormatError(f"{directory / name}: expected the single key {token!r}, found {list(state)[:3]}")
        vectors[token] = state[token]
    return vectors


# ----------------------------------------------------------------------------- Custom Diffusion
def _cd_key(module_name: str, param_name: str) -> str:
    """``<...>.attn2.to_k`` + ``weight`` -> diffusers' ``<...>.attn2.processor.to_k_custom_diffusion.weight``."""
    attn, _, sub = module_name.rpartition(".attn2.")
    attn = f"{attn}.attn2"
    if sub == "to_out.0":
        return f"{attn}.processor.to_out_custom_diffusion.0.{param_name}"
    return f"{attn}.processor.{sub}_custom_diffusion.{param_name}"


def write_custom_diffusion(adapter: Any, backbone: Any, directory: Path, a1111: bool) -> tuple[list[str], dict[str, str]]:
    modules = dict(backbone.unet.named_modules())
    weights = {_cd_key(m, p): modules[m]._parameters[p].detach().float() for m, p in adapter.weight_names()}
    _save(weights, directory / CD_FILE)
    files, token_files = write_token_files(adapter.vectors(backbone), directory, a1111)
    return [CD_FILE] + files, token_files


def read_custom_diffusion(adapter: Any, backbone: Any, directory: Path, token_files: dict[str, str]) -> None:
    state = load_file(str(directory / CD_FILE))
    wanted = {_cd_key(m, p): (m, p) for m, p in adapter.weight_names()}
    if set(state) != set(wanted):
        raise AdapterFormatError(
            f"{directory / CD_FILE}: keys do not match the UNet's cross-attention layers "
            f"(missing {sorted(set(wanted) - set(state))[:3]}, unexpected {sorted(set(state) - set(wanted))[:3]})"
        )
    modules = dict(backbone.unet.named_modules())
    with torch.no_grad():
        for key, (m, p) in wanted.items():
            param = modules[m]._parameters[p]
            if param.shape != state[key].shape:
                raise AdapterFormatError(f"{directory / CD_FILE}: {key} has shape {tuple(state[key].shape)}, the UNet needs {tuple(param.shape)}")
            param.copy_(state[key].to(param.device, param.dtype))
    adapter.set_vectors(backbone, read_token_files(directory, token_files))


def custom_diffusion_processors(unet: torch.nn.Module, path: Path) -> dict[str, Any]:
    """diffusers' own CustomDiffusionAttnProcessors for every attention layer, from our weights file.

    A check that the file means what diffusers means: ``unet.set_attn_processor(result)`` on a base
    UNet computes what our adapted UNet computes. (``unet.load_attn_procs`` skips this step outside
    a pipeline, diffusers issues #7261 / #9320.)
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    state = load_file(str(path))
    processors = unet._process_custom_diffusion(state_dict=state)
    return {name: processors.get(name, AttnProcessor2_0()) for name in unet.attn_processors}


# ----------------------------------------------------------------------------- DreamBooth
def write_dreambooth(adapter: Any, backbone: Any, directory: Path) -> list[str]:
    from diffusers import StableDiffusionPipeline

    from dreamsteer.diffusion.backbone import resolve_model_source

    scheduler = backbone.scheduler
    base = Path(resolve_model_source(backbone.source))
    base_scheduler = base / "scheduler" / "scheduler_config.json"
    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    if base.is_dir() and base_scheduler.is_file():  # keep the base model's sampling scheduler for users
        shutil.copyfile(base_scheduler, directory / "scheduler" / "scheduler_config.json")
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def read_dreambooth(backbone: Any, directory: Path, train_text_encoder: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trained UNet (and text encoder) from a pipeline folder, in the backbone's dtype and device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(directory), subfolder="unet", torch_dtype=backbone.dtype)
    unet.to(backbone.device)
    text_encoder = None
    if train_text_encoder:
        text_encoder = CLIPTextModel.from_pretrained(str(directory), subfolder="text_encoder", dtype=backbone.text_encoder.dtype)
        text_encoder.to(backbone.text_encoder.device)
    return unet, text_encoder


def safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
