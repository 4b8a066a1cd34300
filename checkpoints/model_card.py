"""The model card (``README.md``) of an export folder, in the shape diffusers' training scripts write:
YAML front matter (base model, tags, instance prompt) then what was trained and how to load it in
diffusers, ComfyUI and AUTOMATIC1111. It is documentation only (not in adapter.json's ``files``),
so it may be edited before publishing.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from dreamsteer.checkpoints.formats import A1111_DIR, PIVOT_DIR

CARD = "README.md"

_TITLES = {"lora": "LoRA", "textual_inversion": "Textual Inversion", "custom_diffusion": "Custom Diffusion", "dreambooth": "DreamBooth"}


def _yaml_value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _diffusers_snippet(manifest: dict[str, Any], folder: str) -> str:
    kind, base = manifest["method"], manifest.get("base_model")
    prompt = manifest.get("instance_prompt") or "a photo of ..."
    lines = ["import torch", "from diffusers import StableDiffusionPipeline", ""]
    if kind == "dreambooth":
        lines.append(f"pipe = StableDiffusionPipeline.from_pretrained({folder!r})")
    else:
        lines.append(f"pipe = StableDiffusionPipeline.from_pretrained({base!r})")
    if kind == "lora" and "diffusers" in manifest.get("use_with", {}):
        for token, name in ((manifest.get("pivot") or {}).get("token_files") or {}).items():  # the words it was trained on, first
            lines.append(f"pipe.load_textual_inversion({folder + '/' + name!r}, token={token!r})")
        lines.append(f"pipe.load_lora_weights({folder!r})")
    elif kind == "lora":  # LoHa / LoKr: diffusers has no loader for peft's LoHa / LoKr files
        lines = ["from dreamsteer.checkpoints import load_adapter", "from dreamsteer.diffusion.backbone import load_backbone", "",
                 f"backbone = load_backbone({base!r})", f"load_adapter(backbone, {folder!r})", "pipe = backbone.pipeline()"]
    elif kind in ("textual_inversion", "custom_diffusion"):
        for token, name in manifest.get("token_files", {}).items():
            lines.append(f"pipe.load_textual_inversion({folder + '/' + name!r}, token={token!r})")
    if kind == "custom_diffusion":
        lines += ["from dreamsteer.checkpoints.formats import custom_diffusion_processors",
                  f"pipe.unet.set_attn_processor(custom_diffusion_processors(pipe.unet, {folder + '/pytorch_custom_diffusion_weights.safetensors'!r}))"]
    lines.append(f"image = pipe({prompt!r}).images[0]")
    return "\n".join(lines)


def _tool_steps(manifest: dict[str, Any]) -> list[str]:
    kind = manifest["method"]
    # the pivot words' embeddings (pivot/...) are steps of their own, after the adapter's
    use = {tool: [f for f in files if not f.startswith(f"{PIVOT_DIR}/")] for tool, files in manifest.get("use_with", {}).items()}
    pivot_files = sorted({f for files in manifest.get("use_with", {}).values() for f in files if f.startswith(f"{PIVOT_DIR}/{A1111_DIR}/")})
    out = []
    if kind == "lora":
        for f in use.get("comfyui", []):
            out.append(f"- **ComfyUI**: copy `{f}` into `models/loras/` and add a *LoraLoader* node between *Load Checkpoint* and the sampler.")
        for f in use.get("a1111", []):
            out.append(f"- **AUTOMATIC1111**: copy `{f}` into `models/Lora/` and write `<lora:{f.rsplit('.', 1)[0]}:1>` in the prompt.")
        if not use.get("comfyui"):
            variant = (manifest.get("adapter_config") or {}).get("variant")
            out.append(f"- ComfyUI and AUTOMATIC1111 do not compute this {variant} adapter as trained; use diffusers.")
    elif kind == "textual_inversion":
        for f in use.get("a1111", []):
            stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            out += [f"- **ComfyUI**: copy `{f}` into `models/embeddings/` and write `embedding:{stem}` in the prompt.",
                    f"- **AUTOMATIC1111**: copy `{f}` into `embeddings/` and write `{stem}` in the prompt."]
    elif kind == "dreambooth":
        f = use["a1111"][0]
        out += [f"- **ComfyUI**: copy `{f}` into `models/checkpoints/` and pick it in *Load Checkpoint*.",
                f"- **AUTOMATIC1111**: copy `{f}` into `models/Stable-diffusion/` and pick it as the checkpoint."]
    else:
        out.append("- ComfyUI and AUTOMATIC1111 have no Custom Diffusion loader; use diffusers.")
    for f in pivot_files:
        stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        out.append(f"- The word it was trained on: copy `{f}` into the embeddings folder too (ComfyUI `models/embeddings/`, "
                   f"`embedding:{stem}` in the prompt; AUTOMATIC1111 `embeddings/`, `{stem}`).")
    return out


def model_card(manifest: dict[str, Any], folder_name: str, samples: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown of the card; `samples`: ``(prompt, file name in the folder)`` of validation images."""
    kind = manifest["method"]
    title = _TITLES.get(kind, kind)
    tags = ["text-to-image", "diffusers", "stable-diffusion", kind.replace("_", "-"), "dreamsteer"]
    front = ["---", f"base_model: {_yaml_value(manifest.get('base_model'))}", "library_name: diffusers", "tags:"]
    front += [f"- {t}" for t in tags]
    if manifest.get("instance_prompt"):
        front.append(f"instance_prompt: {_yaml_value(manifest['instance_prompt'])}")
    front.append("---")

    training = manifest.get("training") or {}
    facts = [f"- **Base model**: `{manifest.get('base_model')}` ({manifest.get('prediction_type')} prediction)",
             f"- **Method**: {title} (`{json.dumps(manifest.get('adapter_config'), sort_keys=True)}`)"]
    if manifest.get("tokens"):
        facts.append("- **Trigger tokens**: " + ", ".join(f"`{t}`" for t in manifest["tokens"]))
    if manifest.get("pivot"):
        pivot = manifest["pivot"]
        facts.append("- **Pivot words** (Textual Inversion, frozen while this adapter trained; loaded with it): "
                     + ", ".join(f"`{t}`" for t in pivot["tokens"]) + f" ({pivot['num_vectors']} vector(s) each)")
    if manifest.get("concepts"):  # a multi-concept run: every concept's token and prompts
        facts.append(f"- **Concepts** ({len(manifest['concepts'])}, trained together):")
        for concept in manifest["concepts"]:
            line = f"  - `{concept.get('token') or '-'}`: `{concept.get('instance_prompt')}`"
            if concept.get("class_prompt"):
                line += f" (class prompt `{concept['class_prompt']}`)"
            facts.append(line)
    else:
        if manifest.get("instance_prompt"):
            facts.append(f"- **Instance prompt**: `{manifest['instance_prompt']}`")
        if manifest.get("class_prompt"):
            facts.append(f"- **Class prompt** (prior preservation): `{manifest['class_prompt']}`")
    if manifest.get("training_steps") is not None:
        facts.append(f"- **Training steps**: {manifest['training_steps']}")
    for key in ("resolution", "batch_size", "seed"):
        if training.get(key) is not None:
            facts.append(f"- **{key.replace('_', ' ').capitalize()}**: {training[key]}")

    body = [*front, "", f"# {folder_name}: {title} on {manifest.get('base_model')}", "",
            f"Trained with dreamsteer (`python -m dreamsteer.train personalize method={kind}`).", "", *facts, ""]
    if samples:
        body += ["## Samples", ""]
        body += [f"![{prompt}]({name})  \n*{prompt}*" for prompt, name in samples]
        body.append("")
    body += ["## Use it", "", "### diffusers", "", "```python", _diffusers_snippet(manifest, folder_name), "```", "",
             "### ComfyUI / AUTOMATIC1111", "", *_tool_steps(manifest), "",
             "## Files", "", "| tool | files |", "|---|---|"]
    body += [f"| {tool} | {', '.join(f'`{f}`' for f in files)} |" for tool, files in manifest.get("use_with", {}).items()]
    body += ["", "`adapter.json` records the training config, library versions and the sha256 of every file.", ""]
    return "\n".join(body)


def _merged_words(record: dict[str, Any]) -> list[str]:
    pivot = record.get("pivot")
    if not pivot:
        return []
    words = ", ".join(f"`{t}`" for t in pivot["tokens"])
    return [f"The pivot words of `{pivot['from']}` ({words}) are in this model's tokenizer and text encoder; "
            "for A1111 / ComfyUI, whose checkpoint keeps the base vocabulary, load `pivot/a1111/` as embeddings.", ""]


def merge_card(record: dict[str, Any], folder_name: str, single_file: str) -> str:
    """Markdown of the card of a `merge` output folder (`record`: its merge.json)."""
    base = record.get("base_model")
    loras = [f"- `{x['path']}` x {x['weight']}" for x in record.get("loras", [])]
    return "\n".join([
        "---", f"base_model: {_yaml_value(base)}", "library_name: diffusers", "tags:",
        *[f"- {t}" for t in ("text-to-image", "diffusers", "stable-diffusion", "lora-merged", "dreamsteer")], "---", "",
        f"# {folder_name}: {base} with LoRAs merged in", "",
        "`W' = W + sum_i w_i * (alpha_i / r_i) * up_i @ down_i` for every layer a LoRA touches "
        "(`python -m dreamsteer.train merge`):", "", *loras, "", *_merged_words(record),
        "## Use it", "", "```python", "from diffusers import StableDiffusionPipeline", "",
        f"pipe = StableDiffusionPipeline.from_pretrained({folder_name!r})", "```", "",
        f"- **ComfyUI**: copy `{single_file}` into `models/checkpoints/` and pick it in *Load Checkpoint*.",
        f"- **AUTOMATIC1111**: copy `{single_file}` into `models/Stable-diffusion/` and pick it as the checkpoint.", "",
        "`merge.json` records the inputs and the sha256 of every file.", "",
    ])
