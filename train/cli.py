"""`dreamsteer <task> key=value ...` (or `python -m train ...` from a checkout): a thin Hydra launcher around each task's `run(cfg)`."""
from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

# transformers warns at import about optional torchvision image processors we never use.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Idle OpenMP threads spin by default, which stalls other processes (DDP ranks) sharing the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dreamsteer.train.tasks import TASKS  # noqa: E402

PROG = "dreamsteer" if Path(sys.argv[0]).name == "dreamsteer" else "python -m train"
USAGE = f"usage: {PROG} <task> [key=value ...]   ({PROG} <task> --help shows a task's config)"


def _print_help() -> None:
    print(USAGE)
    print("\ntasks:")
    width = max(len(name) for name in TASKS)
    for name, (_, description) in TASKS.items():
        print(f"  {name:<{width}}  {description}")


def _exit_with(err: Exception) -> None:
    """One line on stderr and exit status 2 (DREAMSTEER_DEBUG=1 re-raises for the traceback)."""
    if os.environ.get("DREAMSTEER_DEBUG"):
        raise err
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help()
        return 0
    task, overrides = argv[0], argv[1:]
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown task '{task}'.{hint} Tasks: {', '.join(TASKS)}", file=sys.stderr)
        return 2

    import hydra

    from dreamsteer.data.files import as_write_error
    from dreamsteer.train.config import CONF_DIR
    from dreamsteer.train.tasks import task_function

    run = task_function(task)

    def hydra_entry(cfg) -> None:
        # Hydra has parsed the overrides; put the program and task back so Lightning's DDP re-launch
        # of ranks > 0 (`python -m train.__main__ <sys.argv[1:]>`, or the `dreamsteer` script) runs the same task.
        sys.argv = [program, task, *sys.argv[1:]]
        try:
            run(cfg)
        except (ValueError, FileNotFoundError) as err:  # user-input errors: a short message, no traceback
            _exit_with(err)
        except OSError as err:  # only what the user can fix (disk full, permissions, read-only): see data.files
            mapped = as_write_error(err)
            if mapped is None:
                raise
            _exit_with(mapped)

    program = sys.argv[0]
    sys.argv = [f"{PROG} {task}", *overrides]  # the program name Hydra's --help shows
    hydra.main(config_path=str(CONF_DIR), config_name=task, version_base="1.3")(hydra_entry)()
    return 0

