"""Reference PyTorch denoisers, one module per family, and the registry the CLI reuses."""
from __future__ import annotations

from . import dit, uvit
from .family import Family, ModelSpec

FAMILIES: dict[str, Family] = {
    "dit": dit.FAMILY,
    "uvit": uvit.FAMILY,
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "ModelSpec", "get_family"]
