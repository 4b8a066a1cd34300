"""Weight formats of each adapter kind: writers into an export folder and readers back onto a backbone.

| kind | files | loads with |
|---|---|---|
| lora | ``pytorch_lora_weights.safetensors`` (diffusers, with the LoraConfig as metadata; variants lora and dora) or ``peft_adapter_weights.safetensors`` (peft's own keys; loha, lokr); ``lora_kohya.safetensors`` (kohya / LyCORIS keys and metadata, `checkpoints.kohya`, `checkpoints.lycoris`) | ``pipe.load_lora_weights(dir)`` (lora, dora); A1111 / ComfyUI / kohya read the kohya file (`use_with` says which) |
| textual_inversion | ``learned_embeds.safetensors`` ``{token: [n, D]}`` (one file per placeholder token: ``learned_embeds_<i>.safetensors`` after the first); ``a1111/<name>.safetensors`` ``{"emb_params": [n, D]}`` | ``pipe.load_textual_inversion(dir)``; A1111 / ComfyUI ``embeddings/`` |
| custom_diffusion | ``pytorch_custom_diffusion_weights.safetensors`` (diffusers' ``save_attn_procs`` keys) + ``learned_embeds*.safetensors`` for the modifier tokens (+ ``a1111/``) | ``load_adapter`` (our loader), or diffusers' CustomDiffusionAttnProcessor built from the file |
| pivot words (LoRA, DreamBooth trained on Textual Inversion words) | ``pivot/``: the words' embedding files, as textual_inversion writes them | ``pipe.load_textual_inversion(dir + "/pivot")`` before the LoRA; A1111 / ComfyUI ``embeddings/`` |
| dreambooth | a complete diffusers pipeline folder (the export folder itself, with the base model's scheduler); ``sd_checkpoint.safetensors``: the same weights in the original SD layout (`checkpoints.sd_single_file`) | ``StableDiffusionPipeline.from_pretrained(dir)``; A1111 / ComfyUI ``checkpoints/`` |

SDXL (two text encoders): the diffusers LoRA file also has ``text_encoder_2.*`` keys and the kohya file SDXL's
names (``lora_unet_<SGM module>``, ``lora_te1_``, ``lora_te2_``, `checkpoints.kohya`); each token's embedding
file (diffusers and A1111 alike) is ``{"clip_l": [n, D1], "clip_g": [n, D2]}``, the rows of text encoders 1
and 2; DreamBooth writes a ``StableDiffusionXLPipeline`` folder and the single file in SDXL's layout.

Every safetensors file is written reproducibly (sorted metadata): the same weights give the same bytes.
Text-encoder weights are named with the ``text_model.`` prefix, the layout of every transformers
release (4.x writes it; 5.x writes it without the prefix but loads both).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dreamsteer.checkpoints import kohya, lycoris
from dreamsteer.checkpoints.safetensors_files import read_metadata, save_safetensors
from dreamsteer.data.files import write_text_atomic
from dreamsteer.diffusion.backbone import dtype_kwargs

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_KOHYA_FILE = "lora_kohya.safetensors"
PEFT_FILE = "peft_adapter_weights.safetensors"
DIFFUSERS_VARIANTS = ("lora", "dora")  # what diffusers' load_lora_weights builds (a LoraConfig, use_dora from the keys)
CD_FILE = "pytorch_custom_diffusion_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"
A1111_DIR = "a1111"
PIVOT_DIR = "pivot"
SINGLE_FILE = "sd_checkpoint.safetensors"
TEXT_ENCODER_WEIGHTS = "text_encoder/model.safetensors"
# SDXL embedding files: one tensor per text encoder, named as A1111, ComfyUI and diffusers' docs name them
SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class AdapterFormatError(ValueError):
    """An adapter file whose content does not fit the adapter it should fill."""


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; AdapterFormatError names the file when it is unreadable or holds NaN/inf."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({err})") from None
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFormatError(f"{path}: tensor {key} has NaN or infinite values")
    return state


def token_file_name(index: int) -> str:
    return TI_FILE if index == 0 else f"learned_embeds_{index}.safetensors"


def a1111_name(token: str) -> str:
    """A file stem A1111 users can type as the trigger word: the token without brackets and odd characters."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", token.strip("<>")) or "embedding"
    return stem


def lora_consumers(variant: str) -> set[str]:
    """The tools that compute a LoRA variant as trained: diffusers (lora, dora); ComfyUI / A1111 read the kohya file,
    but apply a DoRA ``dora_scale`` of one value per output row with another norm (ComfyUI: that of ``W``, not
    ``W + dW``; A1111: one per input column), so not DoRA; kohya's sd-scripts: plain LoRA only. A1111's LoKr reader
    also needs whole factors (`lycoris.a1111_loads`, checked on the written file)."""
    return {"lora": {"diffusers", "a1111", "comfyui", "kohya"}, "dora": {"diffusers"},
            "loha": {"a1111", "comfyui"}, "lokr": {"a1111", "comfyui"}}[variant]


def use_with(kind: str, files: list[str], token_files: dict[str, str], consumers: set[str] | None = None,
             pivot_files: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Which files of an export each tool loads (adapter.json's ``use_with``; LoRA: `consumers` of its variant;
    `pivot_files`: the pivot words' token files, loaded beside the weights, except by diffusers for DreamBooth,
    whose pipeline folder holds the words in its tokenizer and text encoder)."""
    embeddings = sorted(token_files.values())
    a1111 = sorted(f for f in files if f.startswith(A1111_DIR + "/"))
    if kind == "lora":
        table = {"diffusers": [LORA_FILE], "a1111": [LORA_KOHYA_FILE], "comfyui": [LORA_KOHYA_FILE], "kohya": [LORA_KOHYA_FILE]}
        table = {tool: names for tool, names in table.items() if consumers is None or tool in consumers}
    elif kind == "textual_inversion":
        table = {"diffusers": embeddings, "a1111": a1111, "comfyui": a1111}
    elif kind == "custom_diffusion":  # A1111 and ComfyUI have no Custom Diffusion loader
        table = {"diffusers": [CD_FILE, *embeddings]}
    else:
        table = {"diffusers": ["model_index.json"], "a1111": [SINGLE_FILE], "comfyui": [SINGLE_FILE]}
    if pivot_files:
        pivot_a1111 = sorted(f for f in files if f.startswith(f"{PIVOT_DIR}/{A1111_DIR}/"))
        extra = {"diffusers": [] if kind == "dreambooth" else sorted(pivot_files.values()), "a1111": pivot_a1111, "comfyui": pivot_a1111}
        table = {tool: [*names, *extra.get(tool, [])] for tool, names in table.items()}
    return table


# ----------------------------------------------------------------------------- LoRA
def _peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    return get_peft_model_state_dict(module, adapter_name=LORA_ADAPTER_NAME)


def lora_states(backbone: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The attached LoRA's peft states (fp32, CPU) by part: ``unet``, ``text_encoder`` (and SDXL's ``text_encoder_2``),
    empty for a part without LoRA."""
    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if LORA_ADAPTER_NAME not in getattr(module, "peft_config", {}):
            return {}
        return {k: v.detach().float().cpu() for k, v in _peft_state(module).items()}

    return {"unet": state(backbone.unet), **{name: state(encoder) for name, encoder, _ in backbone.family.text_encoders(backbone)}}


def save_diffusers_lora(
    directory: Path, unet_state: dict[str, torch.Tensor], text_state: dict[str, torch.Tensor],
    unet_config: dict[str, Any] | None, text_config: dict[str, Any] | None,
    text_2_state: dict[str, torch.Tensor] | None = None, text_2_config: dict[str, Any] | None = None,
) -> None:
    """diffusers' ``pytorch_lora_weights.safetensors`` from peft states (`*_config`: the LoraConfig dicts, or None);
    `text_2_state`: SDXL's second text encoder (``text_encoder_2.*`` keys, `StableDiffusionXLPipeline`'s writer).

    Text-encoder keys get the ``text_model.`` prefix (see the module docstring); the file is then
    rewritten reproducibly.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    def text_layers(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if not state:
            return None
        return convert_state_dict_to_diffusers({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()})

    kwargs = {}
    if text_2_state:
        kwargs = {"text_encoder_2_lora_layers": text_layers(text_2_state), "text_encoder_2_lora_adapter_metadata": text_2_config}
    writer = StableDiffusionXLPipeline if text_2_state else StableDiffusionPipeline
    writer.save_lora_weights(
        str(directory),
        unet_lora_layers=convert_state_dict_to_diffusers(unet_state) if unet_state else None,
        text_encoder_lora_layers=text_layers(text_state),
        unet_lora_adapter_metadata=unet_config if unet_state else None,
        text_encoder_lora_adapter_metadata=text_config if text_state else None,
        weight_name=LORA_FILE,
        safe_serialization=True,
        **kwargs,
    )
    path = directory / LORA_FILE
    save_safetensors(load_file(str(path)), path, read_metadata(path))


def save_kohya_lora(
    path: Path, backbone: Any, config: dict[str, Any], states: dict[str, dict[str, torch.Tensor]], metadata: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The kohya / LyCORIS file of the attached LoRA (`config`: its adapter config; `states`: `lora_states`) with each
    module's own rank and alpha; `metadata`: `kohya.lora_metadata`'s arguments. Returns the written tensors.
    SDXL: UNet modules in the original SGM names, text encoders ``lora_te1_`` / ``lora_te2_`` (`checkpoints.kohya`)."""
    variant = config.get("variant", "lora")
    sdxl = backbone.family.name == "sdxl"
    tensors: dict[str, torch.Tensor] = {}
    for part, state in states.items():
        if not state:
            continue
        is_text = part != "unet"
        layers = lycoris.layer_ranks_alphas(getattr(backbone, part))
        if sdxl and not is_text:
            state, layers = _renamed(state, layers, kohya.sdxl_unet_rename(backbone.unet.config))
        prefix = (kohya.SDXL_TEXT_PREFIXES[part] if sdxl else kohya.TEXT_PREFIX) if is_text else kohya.UNET_PREFIX
        if variant == "lora":
            tensors.update(kohya.peft_to_kohya(state, prefix, {m: alpha for m, (_, alpha) in layers.items()}, text_encoder=is_text))
        else:
            tensors.update(lycoris.peft_to_lycoris(state, layers, prefix, text_encoder=is_text))
    convs = config.get("conv_target_modules")
    network = lycoris.network_metadata(variant, config.get("conv_rank") if convs else None, config.get("conv_alpha") if convs else None)
    save_safetensors(tensors, path, kohya.lora_metadata(tensors, rank=config["rank"], alpha=config["alpha"], network=network, **metadata))
    return tensors


def _renamed(state: dict[str, torch.Tensor], layers: dict[str, tuple[int, float]], rename: Any
             ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """A peft state and its `layer_ranks_alphas` with every module name passed through `rename`."""
    renamed = {}
    for key, value in state.items():
        module, param = lycoris.split_peft_key(key)
        renamed[f"{rename(module)}.{param}"] = value
    return renamed, {rename(module): value for module, value in layers.items()}


def _model_name(source: str) -> str:
    """A local model path as its folder / file name (kohya's ``ss_sd_model_name``); hub ids and presets unchanged."""
    return Path(source).name if Path(source).expanduser().exists() else source


def kohya_info(backbone: Any, manifest: dict[str, Any], output_name: str) -> dict[str, Any]:
    """The training facts kohya's metadata records, from the backbone and an adapter.json."""
    training = manifest.get("training") or {}
    return {
        "v2": backbone.family.name == "sd" and kohya.is_sd2(backbone.text_encoder.config),
        "sdxl": backbone.family.name == "sdxl",
        "v_prediction": backbone.prediction_type == "v_prediction",
        "base_model": _model_name(str(manifest.get("base_model"))),
        "output_name": output_name,
        "resolution": training.get("resolution") or backbone.resolution,
        "steps": manifest.get("training_steps"),
        "tag_frequency_json": manifest.get("caption_tag_frequency"),
    }


def lora_weights_file(config: dict[str, Any]) -> str:
    """The file `read_lora` fills a LoRA of this adapter config from: diffusers' where diffusers loads the variant."""
    return LORA_FILE if config.get("variant", "lora") in DIFFUSERS_VARIANTS else PEFT_FILE


def write_lora(adapter: Any, backbone: Any, directory: Path, manifest: dict[str, Any], output_name: str) -> tuple[list[str], set[str]]:
    """The LoRA's files (module docstring) and the tools that load them as trained (`lora_consumers`)."""
    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    states = lora_states(backbone)
    weights = lora_weights_file(adapter.config)
    if weights == LORA_FILE:
        configs = {part: getattr(backbone, part).peft_config[LORA_ADAPTER_NAME].to_dict() if state else None for part, state in states.items()}
        save_diffusers_lora(directory, states["unet"], states["text_encoder"], configs["unet"], configs["text_encoder"],
                            states.get("text_encoder_2"), configs.get("text_encoder_2"))
    else:
        save_safetensors({f"{part}.{k}": v for part, state in states.items() for k, v in state.items()}, directory / PEFT_FILE)
    tensors = save_kohya_lora(directory / LORA_KOHYA_FILE, backbone, adapter.config, states, kohya_info(backbone, manifest, output_name))
    consumers = lora_consumers(adapter.variant)
    if not lycoris.a1111_loads(tensors):
        consumers = consumers - {"a1111"}
    return [weights, LORA_KOHYA_FILE], consumers


def _diffusers_to_peft_key(key: str) -> str:
    """diffusers' saved names (``lora.down``, ``lora_linear_layer.down``) -> peft's ``lora_A`` / ``lora_B``."""
    for old in (".lora.", ".lora_linear_layer."):
        key = key.replace(f"{old}down.", ".lora_A.").replace(f"{old}up.", ".lora_B.")
    return key


def read_lora(adapter: Any, backbone: Any, directory: Path) -> None:
    """Fill the attached LoRA layers from the diffusers file (or, for LoHa / LoKr, the peft file): keys
    ``unet.`` / ``text_encoder.`` (/ SDXL's ``text_encoder_2.``) + peft or diffusers names."""
    from peft.utils import set_peft_model_state_dict

    from dreamsteer.diffusion.adapters import LORA_ADAPTER_NAME

    path = directory / lora_weights_file(adapter.config)
    state = read_tensors(path)
    parts = [("unet.", backbone.unet)] + [(f"{name}.", encoder) for name, encoder, _ in backbone.family.text_encoders(backbone)]
    known = tuple(prefix for prefix, _ in parts)
    stray = sorted(k for k in state if not k.startswith(known))
    if stray:
        raise AdapterFormatError(f"{path}: keys {stray[:3]} belong to no part of this model (expected {list(known)})")
    for prefix, module in parts:
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        part = {_diffusers_to_peft_key(k): v for k, v in part.items()}
        expected = _peft_state(module)
        if prefix != "unet." and not any(k.startswith("text_model.") for k in expected):
            part = {k.removeprefix("text_model."): v for k, v in part.items()}  # transformers 5 names
        if set(part) != set(expected):
            raise AdapterFormatError(
                f"{path}: {prefix[:-1]} LoRA keys do not match the adapter config "
                f"(missing {sorted(set(expected) - set(part))[:3]}, unexpected {sorted(set(part) - set(expected))[:3]})"
            )
        for key, value in part.items():
            if value.shape != expected[key].shape:
                raise AdapterFormatError(f"{path}: {prefix}{key} has shape {tuple(value.shape)}, the adapter config "
                                         f"(rank {adapter.config['rank']}) needs {tuple(expected[key].shape)}")
        result = set_peft_model_state_dict(module, part, adapter_name=LORA_ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise AdapterFormatError(f"{path}: unexpected keys {result.unexpected_keys[:3]}")


# ----------------------------------------------------------------------------- token embeddings (TI, CD)
def write_token_files(vectors: dict[str, torch.Tensor], directory: Path) -> tuple[list[str], dict[str, str]]:
    """diffusers' ``learned_embeds*.safetensors`` and A1111's ``a1111/<name>.safetensors`` for each token."""
    files, token_files = [], {}
    for i, (token, rows) in enumerate(vectors.items()):
        name = token_file_name(i)
        save_safetensors({token: rows.float()}, directory / name)
        files.append(name)
        token_files[token] = name
        a_name = f"{A1111_DIR}/{a1111_name(token)}.safetensors"
        save_safetensors({"emb_params": rows.float()}, directory / a_name)
        files.append(a_name)
    return files, token_files


def write_sdxl_token_files(vectors: dict[str, dict[str, torch.Tensor]], directory: Path) -> tuple[list[str], dict[str, str]]:
    """SDXL embeddings, per token ``{"clip_l": [n, D1], "clip_g": [n, D2]}`` from `vectors` ``{encoder name: {token: rows}}``:
    ``learned_embeds*.safetensors`` (diffusers) and ``a1111/<name>.safetensors`` (A1111 / ComfyUI), the same tensors."""
    files, token_files = [], {}
    tokens = list(vectors["text_encoder"])
    for i, token in enumerate(tokens):
        tensors = {key: vectors[name][token].float() for name, key in SDXL_EMBEDDING_KEYS.items()}
        name = token_file_name(i)
        a_name = f"{A1111_DIR}/{a1111_name(token)}.safetensors"
        for file in (name, a_name):
            save_safetensors(tensors, directory / file)
            files.append(file)
        token_files[token] = name
    return files, token_files


def read_sdxl_token_files(directory: Path, token_files: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{encoder name: {token: rows}}`` from SDXL embedding files (`write_sdxl_token_files`)."""
    vectors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in SDXL_EMBEDDING_KEYS}
    for token, file in token_files.items():
        state = read_tensors(directory / file)
        if set(state) != set(SDXL_EMBEDDING_KEYS.values()):
            raise AdapterFormatError(f"{directory / file}: an SDXL embedding needs exactly the keys "
                                     f"{sorted(SDXL_EMBEDDING_KEYS.values())}, found {sorted(state)[:4]}")
        for name, key in SDXL_EMBEDDING_KEYS.items():
            vectors[name][token] = state[key]
    return vectors


def write_pivot_files(backbone: Any, directory: Path) -> tuple[list[str], dict[str, str]]:
    """The pivot words' embedding files in ``<directory>/pivot/`` (names relative to `directory`)."""
    words, target = backbone.words, directory / PIVOT_DIR
    if backbone.family.name == "sdxl":
        files, token_files = write_sdxl_token_files({name: words.vectors(backbone, name) for name in SDXL_EMBEDDING_KEYS}, target)
    else:
        files, token_files = write_token_files(words.vectors(backbone), target)
    return [f"{PIVOT_DIR}/{f}" for f in files], {token: f"{PIVOT_DIR}/{f}" for token, f in token_files.items()}


def read_token_files(directory: Path, token_files: dict[str, str]) -> dict[str, torch.Tensor]:
    vectors = {}
    for token, name in token_files.items():
        state = read_tensors(directory / name)
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


def write_custom_diffusion(adapter: Any, backbone: Any, directory: Path) -> tuple[list[str], dict[str, str]]:
    modules = dict(backbone.unet.named_modules())
    weights = {_cd_key(m, p): modules[m]._parameters[p].detach().float() for m, p in adapter.weight_names()}
    save_safetensors(weights, directory / CD_FILE)
    if backbone.family.name == "sdxl" and adapter.tokens:
        files, token_files = write_sdxl_token_files({name: adapter.vectors(backbone, name) for name in SDXL_EMBEDDING_KEYS}, directory)
    else:
        files, token_files = write_token_files(adapter.vectors(backbone), directory)
    return [CD_FILE] + files, token_files


def read_custom_diffusion(adapter: Any, backbone: Any, directory: Path, token_files: dict[str, str]) -> None:
    state = read_tensors(directory / CD_FILE)
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
    if backbone.family.name == "sdxl" and token_files:
        for name, vectors in read_sdxl_token_files(directory, token_files).items():
            adapter.set_vectors(backbone, vectors, name)
    else:
        adapter.set_vectors(backbone, read_token_files(directory, token_files))


def custom_diffusion_processors(unet: torch.nn.Module, path: Path) -> dict[str, Any]:
    """diffusers' own CustomDiffusionAttnProcessors for every attention layer, from our weights file.

    A check that the file means what diffusers means: ``unet.set_attn_processor(result)`` on a base
    UNet computes what our adapted UNet computes. (``unet.load_attn_procs`` skips this step outside
    a pipeline, diffusers issues #7261 / #9320.)
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    state = read_tensors(path)
    processors = unet._process_custom_diffusion(state_dict=state)
    return {name: processors.get(name, AttnProcessor2_0()) for name in unet.attn_processors}


# ----------------------------------------------------------------------------- DreamBooth
def base_scheduler(backbone: Any) -> Any:
    """The base model's own sampling scheduler (class and config) as loaded, else the backbone's."""
    return backbone.sampling_scheduler if backbone.sampling_scheduler is not None else backbone.scheduler


def write_dreambooth(adapter: Any, backbone: Any, directory: Path) -> list[str]:
    return write_pipeline(backbone, directory)


def write_pipeline(backbone: Any, directory: Path) -> list[str]:
    """The backbone as a diffusers pipeline folder (SDXL: a ``StableDiffusionXLPipeline`` one; the base model's
    scheduler; text encoders named ``text_model.*``) plus the same weights as one checkpoint in the original
    layout (`SINGLE_FILE`); returns every file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dreamsteer.checkpoints.sd_single_file import pipeline_to_original

    sdxl = backbone.family.name == "sdxl"
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=backbone.vae, text_encoder=backbone.text_encoder, text_encoder_2=backbone.text_encoder_2, tokenizer=backbone.tokenizer,
            tokenizer_2=backbone.tokenizer_2, unet=backbone.unet, scheduler=base_scheduler(backbone),
            force_zeros_for_empty_prompt=backbone.family.zero_empty_prompt, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
            scheduler=base_scheduler(backbone), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    for name, _, _ in backbone.family.text_encoders(backbone):
        text_weights = directory / name / "model.safetensors"
        state = load_file(str(text_weights))
        state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state.items()}
        save_safetensors(state, text_weights, read_metadata(text_weights))
        write_vocab_files(directory / name.replace("text_encoder", "tokenizer"))
    single = pipeline_to_original(backbone.unet, backbone.vae, backbone.text_encoder, not sdxl and kohya.is_sd2(backbone.text_encoder.config),
                                  backbone.text_encoder_2 if sdxl else None)
    if backbone.words is not None:  # A1111 / ComfyUI build the base vocabulary; the words go to pivot/ as embeddings
        added = len(backbone.words.tokens) * backbone.words.num_vectors
        single = {k: v[:-added] if k.endswith("token_embedding.weight") else v for k, v in single.items()}
    save_safetensors(single, directory / SINGLE_FILE)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def write_vocab_files(tokenizer_dir: Path) -> None:
    """``vocab.json`` + ``merges.txt`` from ``tokenizer.json`` (BPE) where missing: transformers 5 saves only
    the latter, transformers 4.x's ``CLIPTokenizer`` (what ``model_index.json`` names) reads the former."""
    source = tokenizer_dir / "tokenizer.json"
    if not source.is_file() or (tokenizer_dir / "vocab.json").is_file():
        return
    model = json.loads(source.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    write_text_atomic(json.dumps(model["vocab"], ensure_ascii=False), tokenizer_dir / "vocab.json")
    write_text_atomic("#version: 0.2\n" + "\n".join(merges) + "\n", tokenizer_dir / "merges.txt")


def read_dreambooth(backbone: Any, directory: Path, train_text_encoder: bool) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The trained UNet (and text encoders, ``{name: module}``) from a pipeline folder, in the backbone's dtype and device."""
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(str(directory), subfolder="unet", **dtype_kwargs(backbone.dtype))
        text_encoders = {}
        for name, encoder, _ in backbone.family.text_encoders(backbone) if train_text_encoder else []:
            # cast after loading: transformers < 4.56 ignores a `dtype` keyword and knows only `torch_dtype`, which later ones warn on
            text_encoders[name] = type(encoder).from_pretrained(str(directory), subfolder=name).to(encoder.dtype)
    except Exception as err:  # diffusers / transformers raise many types for a bad folder; name it in one message
        raise AdapterFormatError(f"{directory}: the DreamBooth UNet / text encoders could not be loaded ({type(err).__name__}: {err})") from None
    for name, module in (("unet", unet), *text_encoders.items()):
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise AdapterFormatError(f"{directory / name}: weights have NaN or infinite values")
    unet.to(backbone.device)
    for name, module in text_encoders.items():
        module.to(getattr(backbone, name).device)
    return unet, text_encoders
