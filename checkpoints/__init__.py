"""Export/import: adapter folders in diffusers, kohya/A1111 formats with adapter.json; trimmed Lightning checkpoints."""
from dreamsteer.checkpoints.adapter_io import AdapterLoadError, export_adapter, load_adapter, read_manifest

__all__ = ["AdapterLoadError", "export_adapter", "load_adapter", "read_manifest"]
