"""The task registry: `python -m train <task>` runs `train.<module>.run(cfg)` with `conf/<task>.yaml`."""
from __future__ import annotations

import importlib
from typing import Any, Callable

# task name -> (module under train/, one-line description shown by `python -m train --help`)
TASKS: dict[str, tuple[str, str]] = {
    "demo": ("train.demo", "the whole flow on the tiny model and a bundled photo"),
    "sample": ("train.sample", "text-to-image samples from any model (and adapter)"),
}


def task_function(name: str) -> Callable[[Any], Any]:
    module_name, _ = TASKS[name]
    return importlib.import_module(module_name).run
