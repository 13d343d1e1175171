"""ctcore: train consistency models with the improved techniques of iCT (Song & Dhariwal, 2023).

Importing ctcore is light (no torch); the public names below load their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("ctcore")
"""Decorate a plugin's `ctcore_register_*` functions with this."""

_LAZY = {
    "load_registry": "ctcore.registry",
    "Registry": "ctcore.registry",
    "karras_sigmas": "ctcore.consistency",
    "consistency_scalings": "ctcore.consistency",
    "frechet_distance": "ctcore.fid",
    "read_recipe": "ctcore.recipe",
    "RecipeError": "ctcore.errors",
    "CtcoreError": "ctcore.errors",
    "BuildContext": "ctcore.components",
    "KINDS": "ctcore.components",
    "load_denoiser": "ctcore.convert",
}

__all__ = [
    "KINDS",
    "BuildContext",
    "CtcoreError",
    "RecipeError",
    "Registry",
    "__version__",
    "consistency_scalings",
    "frechet_distance",
    "hookimpl",
    "karras_sigmas",
    "load_denoiser",
    "load_registry",
    "read_recipe",
]

if TYPE_CHECKING:
    from ctcore.components import KINDS, BuildContext
    from ctcore.consistency import consistency_scalings, karras_sigmas
    from ctcore.convert import load_denoiser
    from ctcore.errors import CtcoreError, RecipeError
    from ctcore.fid import frechet_distance
    from ctcore.recipe import read_recipe
    from ctcore.registry import Registry, load_registry


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctcore' has no attribute {name!r}")
