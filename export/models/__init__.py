"""Reference PyTorch denoisers, one module per family, and the registry the CLI reuses.

The registry maps a family name to its module; modules (and torch) are imported only when
a family is used, so ``edgediff --help`` and the runtime never pay for torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from edgediff.runtime.errors import InvalidInput

from .family import Family, ModelSpec

_MODULES = {
    "dit": "dit",
    "uvit": "uvit",
    "ddpm": "ddpm",
    "ddm": "ddm",
    "ddm_cond": "ddm_cond",
    "adm": "adm",
    "lucid": "lucid",
}


class _Registry(Mapping):
    def __getitem__(self, name: str) -> Family:
        if name not in _MODULES:
            raise KeyError(name)
        return importlib.import_module(f"{__name__}.{_MODULES[name]}").FAMILY

    def __iter__(self):
        return iter(_MODULES)

    def __len__(self):
        return len(_MODULES)


FAMILIES: Mapping[str, Family] = _Registry()


def get_family(name: str) -> Family:
    if name not in _MODULES:
        raise InvalidInput(f"unknown family {name!r}; choose from {', '.join(_MODULES)}")
    return FAMILIES[name]


def resolve_config(family: Family, size: str | None, config: dict | None) -> dict:
    """A named configuration (``--size``) or user keyword arguments (``--config``)."""
    if (size is None) == (config is None):
        raise InvalidInput("give exactly one of --size NAME or --config FILE")
    if config is not None:
        if not isinstance(config, dict):
            raise InvalidInput("the --config file must hold a JSON object of constructor keyword arguments")
        return config
    if size not in family.configs:
        raise InvalidInput(f"unknown {family.name} size {size!r}; choose from {', '.join(family.configs)}")
    return dict(family.configs[size])


__all__ = ["FAMILIES", "Family", "ModelSpec", "get_family", "resolve_config"]
