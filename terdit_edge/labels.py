"""Label maps between standard class ids and a model's raw label ids."""
from __future__ import annotations

from .errors import InputError

LABEL_MAPS = ("terdit", "identity")


def terdit_label_map(num_classes: int = 1000) -> list[int]:
    """The released TerDiT models were trained on class folders "0".."999" sorted as strings, so the
    model label of standard class k is the position of str(k) in that order (k=2 -> 112, k=207 -> 121).
    """
    order = sorted(str(i) for i in range(num_classes))
    position = {name: idx for idx, name in enumerate(order)}
    return [position[str(k)] for k in range(num_classes)]


def make_label_map(name: str, num_classes: int) -> list[int]:
    """model_label = map[standard_class_id] for the named map."""
    if name == "terdit":
        return terdit_label_map(num_classes)
    if name == "identity":
        return list(range(num_classes))
    raise InputError(f"unknown label map {name!r}; choose one of {LABEL_MAPS}")
