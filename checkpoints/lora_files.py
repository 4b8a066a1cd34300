"""Read a LoRA made anywhere (our export folder, a diffusers / peft file, a kohya / A1111 / ComfyUI file)
into one form: per module ``(down [r, in], up [out, r])`` with the module's scale ``alpha / r`` folded
into ``up``, so its weight update is ``up @ down`` (`weight_delta`). Module names are the model's own
(``named_modules`` of the UNet / text encoder), which the `merge` and `convert` tasks write back out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreamsteer.checkpoints import kohya
from dreamsteer.checkpoints.formats import LORA_FILE, AdapterFormatError, read_tensors
from dreamsteer.checkpoints.safetensors_files import read_metadata


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not fit the model; the message names the file."""


@dataclass
class LoraWeights:
    """``{module: (down, up)}`` for the UNet and the text encoder; ``up`` already carries ``alpha / r``."""

    unet: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    text_encoder: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def peft_states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """peft ``<module>.lora_A.weight`` / ``lora_B`` states (scale 1) of the UNet and the text encoder."""
        def state(part: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
            out = {}
            for module, (down, up) in part.items():
                out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down, up
            return out

        return state(self.unet), state(self.text_encoder)


def _strip_text_model(module: str, text_modules: set[str]) -> str:
    """A text-encoder module name as the loaded CLIPTextModel names it (with or without ``text_model.``)."""
    if module in text_modules:
        return module
    other = module.removeprefix("text_model.") if module.startswith("text_model.") else "text_model." + module
    return other


def _diffusers_alphas(path: Path) -> dict[str, dict[str, float]]:
    """``{"unet"/"text_encoder": {"default": alpha, <pattern>: alpha}}`` from diffusers' LoRA metadata."""
    meta = read_metadata(path).get("lora_adapter_metadata")
    if not meta:
        return {}
    try:
        config = json.loads(meta)
    except json.JSONDecodeError as err:
        raise LoraFileError(f"{path}: metadata 'lora_adapter_metadata' is not JSON ({err})") from err
    out: dict[str, dict[str, float]] = {}
    for part in ("unet", "text_encoder"):
        if f"{part}.lora_alpha" in config:
            out[part] = {"default": float(config[f"{part}.lora_alpha"]), **{k: float(v) for k, v in (config.get(f"{part}.alpha_pattern") or {}).items()}}
    return out


def _read_diffusers(path: Path, state: dict[str, torch.Tensor], unet_modules: set[str], text_modules: set[str]) -> LoraWeights:
    alphas = _diffusers_alphas(path)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in ("unet", "text_encoder"):
            raise LoraFileError(f"{path}: key {key!r} is neither unet.* nor text_encoder.* (SD 1.x/2.x LoRA expected)")
        for down, up in ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                         (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")):
            if rest.endswith(down) or rest.endswith(up):
                module = rest[: -len(down)] if rest.endswith(down) else rest[: -len(up)]
                pairs.setdefault((part, module), {})["down" if rest.endswith(down) else "up"] = value
                break
        else:
            if not rest.endswith(".alpha"):
                raise LoraFileError(f"{path}: key {key!r} is not a LoRA down/up weight")
    weights = LoraWeights()
    for (part, module), pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            raise LoraFileError(f"{path}: module {part}.{module} needs both a down and an up weight")
        known = unet_modules if part == "unet" else text_modules
        name = module if part == "unet" else _strip_text_model(module, text_modules)
        if name not in known:
            raise LoraFileError(f"{path}: {part} module {module!r} does not exist in this model")
        rank = pair["down"].shape[0]
        table = alphas.get(part, {})
        alpha = next((a for pattern, a in table.items() if pattern != "default" and module.endswith(pattern)), table.get("default", rank))
        alpha = float(state[f"{part}.{module}.alpha"]) if f"{part}.{module}.alpha" in state else alpha
        getattr(weights, part)[name] = (pair["down"].float(), pair["up"].float() * (alpha / rank))
    return weights


def read_lora(path: str | os.PathLike, unet_modules: set[str], text_modules: set[str]) -> LoraWeights:
    """The LoRA in `path` (an export folder, a diffusers file or a kohya file) for a model with these modules."""
    path = Path(path)
    if path.is_dir():
        manifest = path / "adapter.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("method") != "lora":
            raise LoraFileError(f"{path}: not a LoRA export folder (its adapter.json must say method 'lora')")
        variant = (json.loads(manifest.read_text()).get("adapter_config") or {}).get("variant", "lora")
        if variant != "lora":
            raise LoraFileError(f"{path}: a {variant} adapter; merge and convert read plain LoRAs (up @ down) only")
        path = path / LORA_FILE
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file")
    try:
        state = read_tensors(path)
    except AdapterFormatError as err:
        raise LoraFileError(str(err)) from None
    if not state:
        raise LoraFileError(f"{path}: holds no tensors")
    if all(k.startswith((kohya.UNET_PREFIX, kohya.TEXT_PREFIX)) for k in state):
        try:
            unet, text = kohya.kohya_to_peft(state, unet_modules, text_modules)
        except kohya.KohyaFormatError as err:
            raise LoraFileError(f"{path}: {err}") from err
        weights = LoraWeights()
        for part, peft in (("unet", unet), ("text_encoder", text)):
            for key in peft:
                if key.endswith(".lora_A.weight"):
                    module = key[: -len(".lora_A.weight")]
                    name = module if part == "unet" else _strip_text_model(module, text_modules)
                    getattr(weights, part)[name] = (peft[key].float(), peft[f"{module}.lora_B.weight"].float())
        return weights
    return _read_diffusers(path, state, unet_modules, text_modules)


def lora_target_modules(module: torch.nn.Module) -> set[str]:
    """Names of the linear and convolution layers of `module` (where a LoRA can sit)."""
    return {name for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def weight_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``up @ down`` shaped as the layer's weight (linear, or a convolution whose kernel sits in ``down``)."""
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)
