"""Export an attached adapter to a folder (weights + ``adapter.json``) and load it back onto a backbone.

The folder is written to a temporary sibling and renamed into place, so a reader never sees a
half-written export. ``adapter.json`` (the manifest) records the method, base model, its
fingerprint, the adapter's config, tokens, prompts, training steps, library versions, which file
is for which tool (``use_with``) and the sha256 of every file; ``load_adapter`` checks the hashes
and the base model before attaching. Every folder also gets a model card (``README.md``).
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from dreamsteer.checkpoints import formats
from dreamsteer.checkpoints.model_card import CARD, model_card
from dreamsteer.data.files import fsync_dir, is_orphan_temp, make_temp_dir, temp_prefix, write_json_atomic, write_text_atomic, writing
from dreamsteer.data.images import save_image_atomic
from dreamsteer.diffusion.adapters import (
    KINDS,
    AdapterError,
    PivotWords,
    attach_adapter,
    bake_textual_inversion,
    check_text_encoder_lora,
    config_keys,
    fingerprints_match,
    model_fingerprint,
)

MANIFEST = "adapter.json"
FORMAT_VERSION = 1
_PROTECTED = ("method", "format_version", "base_model_fingerprint", "adapter_config", "files", "tokens", "pivot")
_PIVOT_KEYS = {"tokens", "initializer_token", "num_vectors", "token_files"}
# the weights file every export of a kind has (textual inversion: its token files, checked separately)
_WEIGHTS_FILE = {"custom_diffusion": formats.CD_FILE, "dreambooth": "model_index.json"}


class AdapterLoadError(ValueError):
    """An export folder that cannot be loaded onto this backbone; the message names the folder."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "lightning", "dreamsteer"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


class ExportTargetError(ValueError):
    """An export target that must not be replaced; the message names it and why."""


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder written by `export_adapter`: our adapter.json and nothing but the files it lists."""
    directory = Path(path)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed = set(manifest["files"]) | {MANIFEST, CARD}
        manifest["method"], manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
    return present <= listed


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Temp (`tmp`) or moved-aside (`old`) folders of earlier exports to `target` whose writer is gone."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.glob(f".{target.name}.{kind}.*") if p.is_dir() and is_orphan_temp(p))


def recover_export(target: str | os.PathLike) -> None:
    """Finish what a killed export left beside `target`: put a moved-aside adapter back when `target` is
    missing (a kill between the two renames of the fallback swap), then delete the leftovers."""
    target = Path(target)
    for old in reversed(_leftovers(target, "old")):
        moved = old if is_adapter_folder(old) else old / target.name  # older versions nested it one level down
        if not target.exists() and is_adapter_folder(moved):
            os.replace(moved, target)
            fsync_dir(target.parent)
            print(f"restored the adapter {target} that an interrupted export had moved aside")
    for leftover in _leftovers(target, "old") + _leftovers(target, "tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def prepare_export_target(target: str | os.PathLike, protected: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Check that `target` may receive an export, after recovering what a killed export left beside it.

    `target` may be absent, an empty folder or one of our adapter folders (`is_adapter_folder`);
    anything else (a file, a folder of other files, a symlink) is refused, and so is a target that is
    or contains one of the `protected` paths ({description: path}: the run folder, its checkpoints,
    the input data). Raises ExportTargetError naming the target and the reason; returns the target.
    """
    target = Path(target).expanduser()
    resolved = target.resolve()
    for what, path in (protected or {}).items():
        if path is None:
            continue
        guarded = Path(path).expanduser().resolve()
        if resolved == guarded or resolved in guarded.parents:
            raise ExportTargetError(f"export target {target}: it is or contains {what} ({path}); choose another folder")
    existing = next(p for p in (target, *target.parents) if p.exists() or p.is_symlink())
    if existing != target and not existing.is_dir():
        raise ExportTargetError(f"export target {target}: {existing} is a file, not a folder")
    recover_export(target)
    if target.is_symlink():
        raise ExportTargetError(f"export target {target}: is a symlink; give the folder itself")
    if target.exists() and not target.is_dir():
        raise ExportTargetError(f"export target {target}: is a file; an export is a folder, choose another path")
    if target.is_dir() and any(target.iterdir()) and not is_adapter_folder(target):
        raise ExportTargetError(
            f"export target {target}: holds files that are not one of our adapter exports (no {MANIFEST} listing them); "
            "an export replaces its target, so choose an empty or new folder"
        )
    return target


def export_is_stale(target: str | os.PathLike, checkpoint: str | os.PathLike) -> bool:
    """Whether the export at `target` is missing or older than `checkpoint` (a kill during the final export)."""
    manifest, checkpoint = Path(target) / MANIFEST, Path(checkpoint)
    if not checkpoint.is_file():
        return False
    return not manifest.is_file() or manifest.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished export `tmp` at `target`. An existing `target` is swapped with `tmp` in one step,
    so readers always find a complete adapter; where the swap is not supported it is first renamed to
    a `.old.` sibling, which `recover_export` puts back if a kill lands between the two renames."""
    fsync_dir(tmp)
    if not target.exists():
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous export
    else:
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{target.name}.old"), dir=target.parent))
        os.replace(target, old)  # onto the empty folder
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)


def export_adapter(backbone: Any, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None, samples: Sequence[tuple[str, Any]] = ()) -> Path:
    """Write ``backbone.adapter`` to `out_dir` in every format of its kind (see `checkpoints.formats`).

    `extra` is merged into adapter.json (prompts, ``training_steps``, ``caption_tag_frequency``,
    steering info ...); it may not override what describes the weights (method, config, tokens,
    files, fingerprint). `samples`: ``(prompt, PIL image)`` pairs (validation images), saved as
    ``samples/<i>.png`` and shown in the model card.
    `out_dir` must be absent, empty or one of our adapter folders (`prepare_export_target`).
    Returns the export folder.
    """
    adapter = backbone.adapter
    if adapter is None:
        raise AdapterError("the backbone has no adapter to export")
    extra = dict(extra or {})
    clash = [k for k in _PROTECTED if k in extra]
    if clash:
        raise ValueError(f"export_adapter: extra may not set {clash}")
    target = prepare_export_target(out_dir)
    with writing(target):  # disk full while writing any file: one error naming the export; the old export stays
        target.parent.mkdir(parents=True, exist_ok=True)
        return _write_export(backbone, adapter, target, extra, samples)


def _write_export(backbone: Any, adapter: Any, target: Path, extra: dict[str, Any], samples: Sequence[tuple[str, Any]]) -> Path:
    """Write the export into a temp folder beside `target`, then swap it in (`export_adapter`)."""
    tmp = make_temp_dir(target.parent, f".{target.name}.tmp")
    try:
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "method": adapter.kind,
            "base_model": backbone.source,
            "base_model_fingerprint": adapter.base_fingerprint,
            "prediction_type": backbone.prediction_type,
            "adapter_config": adapter.config,
            "tokens": list(adapter.tokens),
            "instance_prompt": None,
            "class_prompt": None,
            "training_steps": None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
        }
        manifest.update(extra)
        token_files: dict[str, str] = {}
        consumers = None
        if adapter.kind == "lora":
            files, consumers = formats.write_lora(adapter, backbone, tmp, manifest, output_name=target.name)
        elif adapter.kind == "textual_inversion" and backbone.family.name == "sdxl":
            files, token_files = formats.write_sdxl_token_files(
                {name: adapter.vectors(backbone, name) for name in formats.SDXL_EMBEDDING_KEYS}, tmp)
        elif adapter.kind == "textual_inversion":
            files, token_files = formats.write_token_files(adapter.vectors(backbone), tmp)
        elif adapter.kind == "custom_diffusion":
            files, token_files = formats.write_custom_diffusion(adapter, backbone, tmp)
        elif adapter.kind == "dreambooth":
            files = formats.write_dreambooth(adapter, backbone, tmp)
        else:
            raise AdapterError(f"unknown adapter kind {adapter.kind!r}")
        pivot_files: dict[str, str] = {}
        if backbone.words is not None:
            written, pivot_files = formats.write_pivot_files(backbone, tmp)
            files = [*files, *written]
            manifest["pivot"] = {**backbone.words.config, "token_files": pivot_files}
        sample_files = [(prompt, f"samples/{i}.png") for i, (prompt, _) in enumerate(samples)]
        for (_, image), (_, name) in zip(samples, sample_files):
            save_image_atomic(image, tmp / name)
        files = [*files, *(name for _, name in sample_files)]
        manifest["token_files"] = token_files
        manifest["use_with"] = formats.use_with(adapter.kind, files, token_files, consumers, pivot_files)
        manifest["files"] = {name: sha256_file(tmp / name) for name in sorted(files)}
        write_json_atomic(manifest, tmp / MANIFEST)
        write_text_atomic(model_card(manifest, target.name, sample_files), tmp / CARD)
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_manifest(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """adapter.json of an export folder (FileNotFoundError / AdapterLoadError name the folder).

    Also refuses, before any model is loaded, an adapter the installed libraries cannot attach (text-encoder LoRA
    under a transformers that rejects the installed peft).
    """
    directory = Path(adapter_dir)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory}: not found")
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {directory}: no {MANIFEST} (was it written by `export_adapter`?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    for key in ("method", "base_model_fingerprint", "adapter_config", "files"):
        if key not in manifest:
            raise AdapterLoadError(f"{path}: missing key {key!r}")
    if manifest["method"] == "lora" and isinstance(manifest["adapter_config"], dict) and manifest["adapter_config"].get("text_encoder"):
        try:
            check_text_encoder_lora()
        except AdapterError as err:
            raise AdapterLoadError(f"adapter folder {directory}: {err}") from None
    _check_manifest(directory, manifest)
    return manifest


def _check_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """What adapter.json says must be loadable as written: a known method, a config of that method's keys,
    the method's weights files listed, every listed file a plain path inside the folder."""
    path = directory / MANIFEST
    kind, config, files = manifest["method"], manifest["adapter_config"], manifest["files"]
    if kind not in KINDS:
        raise AdapterLoadError(f"{path}: method {kind!r} is not one of {list(KINDS)}")
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path}: adapter_config must be an object, got {config!r}")
    unknown = sorted(set(config) - config_keys(kind))
    if unknown:
        raise AdapterLoadError(f"{path}: adapter_config keys {unknown} do not belong to method {kind!r} (was 'method' or 'adapter_config' edited?)")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise AdapterLoadError(f"{path}: 'files' must map file names to sha256 digests")
    for name in files:
        _inside(directory, name)
    token_files = manifest.get("token_files") or {}
    if not isinstance(token_files, dict) or any(name not in files for name in token_files.values()):
        raise AdapterLoadError(f"{path}: every 'token_files' entry must be one of the hashed 'files'")
    _check_pivot(path, manifest.get("pivot"), kind, files)
    needed = formats.lora_weights_file(config) if kind == "lora" else _WEIGHTS_FILE.get(kind)
    if (needed and needed not in files) or (kind == "textual_inversion" and not token_files):
        raise AdapterLoadError(f"{path}: method {kind!r} needs {needed or 'token files'} listed in 'files' (was 'method' edited?)")


def _check_pivot(path: Path, pivot: Any, kind: str, files: dict[str, str]) -> None:
    """adapter.json's ``pivot`` (the Textual Inversion words a LoRA / DreamBooth trained on): absent, or every key of it,
    with a hashed token file per token."""
    if pivot is None:
        return
    if kind not in ("lora", "dreambooth"):
        raise AdapterLoadError(f"{path}: 'pivot' words belong to a LoRA or DreamBooth export, not to method {kind!r}")
    if not isinstance(pivot, dict) or set(pivot) != _PIVOT_KEYS:
        raise AdapterLoadError(f"{path}: 'pivot' must be an object with exactly the keys {sorted(_PIVOT_KEYS)}, got {pivot!r}")
    tokens, token_files, n = pivot["tokens"], pivot["token_files"], pivot["num_vectors"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise AdapterLoadError(f"{path}: 'pivot.tokens' must be a non-empty list of strings, got {tokens!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(pivot["initializer_token"], str):
        raise AdapterLoadError(f"{path}: 'pivot.num_vectors' must be an integer >= 1 and 'pivot.initializer_token' a string")
    if not isinstance(token_files, dict) or sorted(token_files) != sorted(tokens) or any(f not in files for f in token_files.values()):
        raise AdapterLoadError(f"{path}: 'pivot.token_files' must name one hashed file of 'files' per pivot token {tokens}")


def _inside(directory: Path, name: str) -> Path:
    """`directory / name` for a relative name that stays inside `directory` (symlinks resolved); else AdapterLoadError."""
    relative = Path(name)
    target = directory / relative
    root = directory.resolve()
    if relative.is_absolute() or ".." in relative.parts or not name.strip():
        raise AdapterLoadError(f"adapter folder {directory}: refusing file {name!r} listed in {MANIFEST}: not a plain path inside the folder")
    if root not in target.resolve().parents:
        raise AdapterLoadError(f"adapter folder {directory}: refusing file {name!r} listed in {MANIFEST}: it resolves outside the folder (symlink?)")
    return target


def verify_files(adapter_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    directory = Path(adapter_dir)
    for name, digest in manifest["files"].items():
        path = _inside(directory, name)
        if not path.is_file():
            raise AdapterLoadError(f"adapter folder {directory}: file {name} listed in {MANIFEST} is missing")
        if sha256_file(path) != digest:
            raise AdapterLoadError(f"adapter folder {directory}: file {name} does not match its sha256 in {MANIFEST} (corrupt or edited)")


def check_adapter_folder(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything about an export folder that needs no model: adapter.json, its listed files and their hashes.
    Returns the manifest (tasks call this before loading the base model)."""
    manifest = read_manifest(adapter_dir)
    verify_files(adapter_dir, manifest)
    return manifest


def load_adapter(backbone: Any, adapter_dir: str | os.PathLike, trainable: bool = False, check_base: bool = True) -> dict[str, Any]:
    """Attach the adapter exported in `adapter_dir` to `backbone` with its weights; return the manifest.

    Checks every file's sha256 and that `backbone` is the base model the adapter was trained on
    (`check_base=False` skips the latter, e.g. to try a LoRA on a fine-tune of its base).
    The adapter's parameters are left frozen unless `trainable` (``trainable_parameters`` also marks them).
    """
    directory = Path(adapter_dir)
    manifest = check_adapter_folder(directory)
    if backbone.adapter is not None:
        raise AdapterLoadError(f"adapter folder {directory}: the backbone already has a {backbone.adapter.kind} adapter")
    if backbone.words is not None:
        raise AdapterLoadError(f"adapter folder {directory}: the backbone already has pivot words {backbone.words.tokens}; load a fresh one")
    if check_base:
        current = model_fingerprint(backbone)
        if not fingerprints_match(current, manifest["base_model_fingerprint"]):
            raise AdapterLoadError(
                f"adapter folder {directory} was trained on base model {manifest.get('base_model')!r}, "
                f"which differs from the loaded model {backbone.source!r} (architecture or weights); "
                "load the adapter's base model, or pass check_base=False to force it"
            )
    kind, config = manifest["method"], dict(manifest["adapter_config"])
    try:
        if manifest.get("pivot") is not None:
            install_pivot(backbone, directory, manifest["pivot"])
        if kind == "dreambooth":
            _load_dreambooth(backbone, directory, config)
        else:
            try:
                adapter = attach_adapter(backbone, kind, **config)
            except AdapterError:
                raise
            except (TypeError, ValueError) as err:  # values of the wrong type or range in adapter_config
                raise AdapterError(f"adapter_config {config} does not fit method {kind!r} ({err})") from None
            if kind == "lora":
                formats.read_lora(adapter, backbone, directory)
            elif kind == "textual_inversion":
                _fill_textual_inversion(adapter, backbone, directory, manifest["token_files"])
            elif kind == "custom_diffusion":
                formats.read_custom_diffusion(adapter, backbone, directory, manifest["token_files"])
    except (AdapterError, formats.AdapterFormatError) as err:
        message = str(err) if str(directory) in str(err) else f"adapter folder {directory}: {err}"
        raise AdapterLoadError(message) from err
    backbone.adapter.base_fingerprint = manifest["base_model_fingerprint"]
    backbone.adapter.set_trainable(backbone, trainable)
    return manifest


def install_pivot(backbone: Any, directory: Path, pivot: dict[str, Any]) -> PivotWords:
    """An export's pivot words (its checked adapter.json's ``pivot``) into the backbone's vocabulary (a Textual Inversion
    attached, filled and baked)."""
    adapter = attach_adapter(backbone, "textual_inversion", tokens=pivot["tokens"], initializer_token=pivot["initializer_token"],
                             num_vectors=pivot["num_vectors"])
    _fill_textual_inversion(adapter, backbone, directory, pivot["token_files"])
    return bake_textual_inversion(backbone)


def _fill_textual_inversion(adapter: Any, backbone: Any, directory: Path, token_files: dict[str, str]) -> None:
    if backbone.family.name == "sdxl":
        for name, vectors in formats.read_sdxl_token_files(directory, token_files).items():
            adapter.set_vectors(backbone, vectors, name)
    else:
        adapter.set_vectors(backbone, formats.read_token_files(directory, token_files))


def load_pivot(backbone: Any, adapter_dir: str | os.PathLike) -> PivotWords:
    """A Textual Inversion export's words into `backbone`'s vocabulary, frozen, for a LoRA or DreamBooth to train on."""
    directory = Path(adapter_dir)
    method = read_manifest(directory)["method"]  # load_adapter checks the files' hashes
    if method != "textual_inversion":
        raise AdapterLoadError(f"adapter folder {directory}: pivot words come from a textual_inversion export, this one is {method!r}")
    load_adapter(backbone, directory)
    return bake_textual_inversion(backbone)


def _load_dreambooth(backbone: Any, directory: Path, config: dict[str, Any]) -> None:
    """The export's UNet (text encoders) replace the backbone's, which become the frozen base for `disabled`."""
    from dreamsteer.diffusion.adapters import DreamBoothAdapter

    fingerprint = model_fingerprint(backbone)
    train_te = bool(config.get("train_text_encoder", False))
    unet, text_encoders = formats.read_dreambooth(backbone, directory, train_te)
    base_unet, base_text = backbone.unet, {name: getattr(backbone, name) for name in text_encoders}
    backbone.unet = unet.requires_grad_(False).eval()
    for name, encoder in text_encoders.items():
        setattr(backbone, name, encoder.requires_grad_(False).eval())
    config = {"train_text_encoder": train_te, "keep_base": True}
    backbone.adapter = DreamBoothAdapter(config, fingerprint, base_unet, base_text)
