"""Command-line argument types shared by every front-end (the CLI's subcommands, the server's and
the sampling jobs' options) and by :mod:`terdit_edge.settings`.

Each type turns one argument's text into a value or raises ``argparse.ArgumentTypeError`` with a
message naming what was expected (argparse then exits with status 2). This module sits below the
front-ends and imports nothing of theirs, so that any of them can use it without an import circle.
"""
from __future__ import annotations

import argparse
from typing import Callable

from .errors import InputError


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a message naming `what` on failure."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return v
    parse.__name__ = f"{what.replace('-', '_')}_int"  # argparse names the type in its messages
    return parse


def int_in_range(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in lo..hi (a --port of 99999 is an error, not port 34463)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} ({lo}..{hi}), got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected a {what} in {lo}..{hi}, got {v}")
        return v
    parse.__name__ = f"{what}_int"
    return parse


positive_int = int_at_least(1, "positive")
non_negative_int = int_at_least(0, "non-negative")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def checked(parse_text: Callable[[str], object], check: Callable[[object], object], name: str) -> Callable:
    """An argparse type from a text parser and a value check that raises InputError (the check the
    library applies to the same value from JSON or Python): one rule, one message, for every way in."""
    def parse(text: str):
        try:
            return check(parse_text(text))
        except (InputError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"bad value {text!r}") from None
    parse.__name__ = name
    return parse


def add_backend_arguments(parser: argparse.ArgumentParser, threads_help: str = "CPU threads (default: all)") -> None:
    """``--backend`` (choices: the backend registry) and ``--threads``: how a model runs, which does
    not change what a setting means (they are not part of :class:`~terdit_edge.settings.GenerationSettings`)."""
    from .kernels import backend_names

    parser.add_argument("--backend", choices=("auto", *backend_names()), default="auto",
                        help="compute backend (default auto: the fastest available CPU backend)")
    parser.add_argument("--threads", type=positive_int, default=None, help=threads_help)
