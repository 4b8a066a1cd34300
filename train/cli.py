"""`dreamsteer <task> key=value ...` (or `python -m train ...` from a checkout): a thin Hydra launcher around each task's `run(cfg)`."""
from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
from pathlib import Path

# transformers warns at import about optional torchvision image processors we never use.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dreamsteer.train.tasks import TASKS  # noqa: E402

PROG = "dreamsteer" if Path(sys.argv[0]).name == "dreamsteer" else "python -m train"
USAGE = f"usage: {PROG} <task> [key=value ...]   ({PROG} <task> --help shows a task's config)"


def _print_help() -> None:
    print(USAGE)
    print("\ntasks:")
    width = max(len(name) for name in TASKS)
    for name, (_, description) in TASKS.items():
        print(f"  {name:<{width}}  {description}")


def _exit_with(err: Exception, status: int = 2) -> None:
    """One line on stderr and exit `status` (DREAMSTEER_DEBUG=1 re-raises for the traceback)."""
    if os.environ.get("DREAMSTEER_DEBUG"):
        raise err
    print(f"error: {err}", file=sys.stderr)
    sys.exit(status)


def _shell_quoted(override: str) -> str | None:
    """`key=value` with the value (or each item of a ``[a, b]`` list) quoted for Hydra and the whole for a POSIX
    shell, e.g. ``key="'a <b> c'"``; None unless Hydra reads that back as exactly the value typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    key, sep, value = override.partition("=")
    quote = "'" if "'" not in value else '"'
    if not sep or quote in value or "\\" in value:
        return None
    items = re.fullmatch(r"\[(.*)\]", value)
    if items:
        meant = [item.strip() for item in items.group(1).split(",")]
        hydra_value = "[" + ",".join(f"{quote}{item}{quote}" for item in meant) + "]"
    elif value.startswith(("[", "{")):
        return None  # a broken list or dict, not a string
    else:
        meant, hydra_value = value, f"{quote}{value}{quote}"
    try:
        if OverridesParser.create().parse_override(f"{key}={hydra_value}").value() != meant:
            return None
    except HydraException:
        return None
    if quote == "'" and not any(c in value for c in '"$`!'):
        return f'{key}="{hydra_value}"'
    return shlex.quote(f"{key}={hydra_value}")


def override_error(args: list[str]) -> str | None:
    """One line for the first override Hydra's grammar rejects, or reads as a sweep in a single run, with its quoted form.

    Hydra would print its own message (``LexerNoViableAltException`` ...) without the fix; prompts with ``<token>``
    or a comma are the usual cause. None when every override parses.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parsed = get_args_parser().parse_args(args)  # Hydra's own command line: flags apart from overrides
    parser = OverridesParser.create()
    for override in parsed.overrides:
        try:
            (result,) = parser.parse_overrides([override])
        except OverrideParseException:
            problem = "Hydra's override grammar cannot read this value unquoted; quote it"
        else:
            if not result.is_sweep_override() or parsed.multirun:
                continue
            problem = "Hydra reads the comma as a sweep over several values (a list is key=[a,b]); for one string quote it"
        quoted = _shell_quoted(override)
        if quoted is None:
            return None  # not a quoting problem: Hydra's own message says more
        return f"error: override {override!r}: {problem}: {quoted}"
    return None


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

    error = override_error(overrides)
    if error:
        print(error, file=sys.stderr)
        return 2

    import hydra

    from dreamsteer.data.files import as_write_error
    from dreamsteer.train.config import CONF_DIR, TaskFailed
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
        except TaskFailed as err:
            _exit_with(err, status=1)

    program = sys.argv[0]
    sys.argv = [f"{PROG} {task}", *overrides]  # the program name Hydra's --help shows
    hydra.main(config_path=str(CONF_DIR), config_name=task, version_base="1.3")(hydra_entry)()
    return 0

