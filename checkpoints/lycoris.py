"""The kohya / LyCORIS file of the LoRA variants (DoRA, LoHa, LoKr) and of LoRAs with per-module ranks or convolutions.

Module names are kohya's (``lora_unet_<module with _>``, ``lora_te_text_model_<module with _>``, see
`checkpoints.kohya`); each module holds, as ComfyUI (``comfy/weight_adapter``) and A1111 (``extensions-builtin/Lora``)
read them, with ``s = alpha / dim`` (``.alpha`` over the rank ``dim`` the loader reads from the shapes):

| variant | tensors per module | weight update |
|---|---|---|
| lora | ``lora_down.weight`` [r, in(, k, k)], ``lora_up.weight`` [out, r(, 1, 1)], ``alpha`` | ``s up @ down`` |
| dora | the lora tensors + ``dora_scale`` [out, 1(, 1, 1)] (peft's magnitude, one per output row) | ``m V / ||V||_row`` with ``V = W + s up @ down`` |
| loha | ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in*k*k], ``hada_w2_a``, ``hada_w2_b``, ``alpha`` (dim = ``hada_w1_b``'s rows) | ``s (w1a @ w1b) * (w2a @ w2b)`` |
| lokr | ``lokr_w1`` or ``lokr_w1_a``/``_b``; ``lokr_w2`` or ``lokr_w2_a``/``_b``; ``alpha`` when a factor is split (dim = its rank) | ``s kron(w1, w2)`` |

A LoKr whose factors are both whole has no ``dim`` (the loaders use ``s = 1``), so peft's ``alpha / r`` is
folded into ``lokr_w1`` and no ``.alpha`` is written. peft's tensors already follow these names and
orientations (peft's LoHa / LoKr follow LyCORIS), so apart from that fold and the DoRA reshape the
values are peft's own.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from dreamsteer.checkpoints import kohya

LYCORIS_MODULE = "lycoris.kohya"
# peft's tensor name -> the file's (per module); the DoRA magnitude is handled separately
_FILE_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_PEFT_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def layer_ranks_alphas(model: torch.nn.Module) -> dict[str, tuple[int, float]]:
    """``{module name: (rank, alpha)}`` of the attached peft layers of `model` (after rank / alpha patterns)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    out = {}
    for name, module in model.named_modules():
        ranks = getattr(module, "r", None)
        if isinstance(module, BaseTunerLayer) and isinstance(ranks, dict) and LORA_ADAPTER_NAME in ranks:
            alphas = module.lora_alpha if hasattr(module, "lora_alpha") else module.alpha
            out[name] = (int(ranks[LORA_ADAPTER_NAME]), float(alphas[LORA_ADAPTER_NAME]))
    return out


def split_peft_key(key: str) -> tuple[str, str]:
    """``<module>.<peft tensor name>`` -> (module, tensor name)."""
    for param in _PEFT_PARAMS:
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    raise kohya.KohyaFormatError(f"unexpected adapter key {key!r}")


def peft_to_lycoris(
    state: dict[str, torch.Tensor], layers: dict[str, tuple[int, float]], prefix: str, text_encoder: bool,
) -> dict[str, torch.Tensor]:
    """peft's state of one model (`layers`: `layer_ranks_alphas` of it) -> kohya / LyCORIS tensors (table above)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, param = split_peft_key(key)
        modules.setdefault(module, {})[param] = value
    out: dict[str, torch.Tensor] = {}
    for module, tensors in sorted(modules.items()):
        rank, alpha = layers[module]
        name = prefix + (module if not text_encoder or module.startswith("text_model.") else "text_model." + module).replace(".", "_")
        entries = {_FILE_NAMES.get(param, param): value for param, value in tensors.items() if param != "lora_magnitude_vector"}
        if "lora_magnitude_vector" in tensors:
            up = tensors["lora_B.weight"]
            entries["dora_scale"] = tensors["lora_magnitude_vector"].reshape(up.shape[0], *[1] * (up.dim() - 1))
        if "lokr_w1" in entries and "lokr_w2" in entries:  # no factor rank: the loaders apply scale 1
            entries["lokr_w1"] = entries["lokr_w1"] * (alpha / rank)
        else:
            entries["alpha"] = torch.tensor(float(alpha))
        out.update({f"{name}.{param}": value.contiguous() for param, value in entries.items()})
    return out


def network_args(variant: str, conv_rank: int | None, conv_alpha: float | None) -> dict[str, str]:
    """kohya's ``ss_network_args`` (LyCORIS' ``algo``; ``conv_dim`` / ``conv_alpha`` when convolutions are adapted)."""
    args = {} if variant == "lora" else {"algo": "lora" if variant == "dora" else variant}
    if variant == "dora":
        args.update({"dora_wd": "True", "wd_on_output": "True"})
    if conv_rank is not None:
        args.update({"conv_dim": str(int(conv_rank)), "conv_alpha": str(float(conv_alpha))})
    return args


def network_metadata(variant: str, conv_rank: int | None, conv_alpha: float | None) -> dict[str, str]:
    """``ss_network_module`` (+ ``ss_network_args``) of a file of this variant."""
    module = kohya.NETWORK_MODULE if variant == "lora" else LYCORIS_MODULE
    args = network_args(variant, conv_rank, conv_alpha)
    return {"ss_network_module": module, **({"ss_network_args": json.dumps(args, sort_keys=True)} if args else {})}


def a1111_loads(tensors: dict[str, Any]) -> bool:
    """Whether A1111 can read the file: its LoKr reader tests ``if self.w1b`` on a tensor, which raises for
    factored LoKr factors (``lokr_w1_b`` / ``lokr_w2_b`` of more than one value)."""
    return not any(k.endswith((".lokr_w1_b", ".lokr_w2_b")) and v.numel() > 1 for k, v in tensors.items())
