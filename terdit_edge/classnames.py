"""Class names: ImageNet-1k names shipped with the package, or names stored in a model file."""
from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from importlib import resources

from .errors import InputError


@lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in standard class-id order (short names, e.g. "tabby")."""
    text = resources.files("terdit_edge").joinpath("data/imagenet_classes.json").read_text("utf-8")
    return json.loads(text)


def _words(s: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", s.lower()))


def resolve_class(value, names: list[str]) -> int:
    """A class id (int or digit string) or a class name -> standard class id.

    Names match case-insensitively; a longer phrase that contains all words of exactly one class name
    ("tabby cat" -> "tabby") is accepted too. Unknown names raise InputError listing close names.
    """
    n = len(names)
    if isinstance(value, (int,)) and not isinstance(value, bool):
        idx = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and value.strip() not in names:
        idx = int(value.strip())
    elif isinstance(value, str):
        key = value.strip().lower()
        exact = [i for i, name in enumerate(names) if name.lower() == key]
        if len(exact) == 1:
            return exact[0]
        if len(exact) > 1:
            raise InputError(f"class name {value!r} is ambiguous: ids {exact}; pass the id instead")
        want = _words(value)
        within = [i for i, name in enumerate(names) if _words(name) and _words(name) <= want]
        if len(within) == 1:
            return within[0]
        close = difflib.get_close_matches(key, [x.lower() for x in names], n=5, cutoff=0.6)
        close += [names[i].lower() for i in within if names[i].lower() not in close]
        hint = f"; did you mean {', '.join(repr(c) for c in close[:6])}?" if close else ""
        raise InputError(f"unknown class name {value!r}{hint} (or pass a class id 0..{n - 1})")
    else:
        raise InputError(f"class must be an id or a name, got {value!r}")
    if not 0 <= idx < n:
        raise InputError(f"class id {idx} is out of range: this model has classes 0..{n - 1}")
    return idx
