"""What every command-line tool shares: bad input is ONE line on stderr and exit status 2, never a
traceback. That holds for argparse's own errors (`ArgumentParser`), for argument values checked by
the `type=` helpers below, and for the errors a command names as bad input (`guard`)."""
from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys

import torch

from .config import PRESETS


class UsageError(ValueError):
    """Bad command-line input found after parsing: a missing file, options that do not go together."""


def one_line(error: BaseException | str) -> str:
    """The message on one line: detail lines (e.g. CheckpointError's one line per problem) joined by '; '."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def fail(error: BaseException | str) -> int:
    """Print `error: MESSAGE` on one line of stderr; the exit status for bad input."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


def guard(*errors: type[BaseException]):
    """Decorate a command's main(argv): the given error types (and UsageError, OSError) become one line
    and exit status 2. Anything else is a bug and keeps its traceback."""
    caught = (UsageError, OSError, *errors)

    def wrap(main):
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except caught as e:
                return fail(e)
        return guarded
    return wrap


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`error: MESSAGE (see PROG --help)`), status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


# ---- `type=` checks: argparse reports their message as `argument --NAME: MESSAGE` ---------------------
def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port, where a server listens)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, milliseconds, megabytes)."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def preset_name(text: str) -> str:
    if text.replace("_", "-") not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; known: {', '.join(sorted(PRESETS))}")
    return text


def device_name(text: str) -> str:
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:N'."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda, cuda:N)")
    return text


# ---- optional dependencies ------------------------------------------------------------------------
# setup.py's extras: import name -> distribution name, of the modules each one brings.
EXTRAS = {
    "chat": {"transformers": "transformers", "sentencepiece": "sentencepiece", "PIL": "pillow"},
    "cluster": {"ray.serve": "ray[serve]", "fastapi": "fastapi", "starlette": "starlette", "yaml": "pyyaml",
                "sphn": "sphn"},
}


def require_extras(what: str, extra: str = "chat") -> None:
    """UsageError naming each module of setup.py's `extra` that does not import here (and why), for `what`
    (a command or an option), with the install command. A module that imports but breaks later is not
    this error."""
    missing = []
    for module, dist in EXTRAS[extra].items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{dist} ({e})")
    if missing:
        raise UsageError(f"{what} needs the {extra} extras; not importable here: {', '.join(missing)}: "
                         f"pip install -e '.[{extra}]'")
