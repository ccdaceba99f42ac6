"""Backbone families by name (``backbone.family``). A new family is one module declaring a
:class:`~.base.BackboneFamily` (see :mod:`.clip`, :mod:`.vlm`) plus its entry in :data:`FAMILIES`."""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from . import clip, vlm
from .base import BackboneFamily

FAMILIES: dict[str, BackboneFamily] = {f.name: f for f in (clip.FAMILY, vlm.FAMILY)}
DEFAULT_FAMILY = "clip"  # a config without backbone.family


def family_name(section: Any) -> str:
    """``backbone.family`` of a raw mapping or a validated section (the default when absent)."""
    if isinstance(section, dict):
        return section.get("family", DEFAULT_FAMILY)
    return getattr(section, "family", DEFAULT_FAMILY)


def backbone_section():
    """The ``backbone`` config type: one section per family, told apart by ``family``."""
    known = " or ".join(repr(n) for n in FAMILIES)
    return Annotated[Union[tuple(Annotated[f.config, Tag(n)] for n, f in FAMILIES.items())],
                     Discriminator(family_name, custom_error_type="unknown_family",
                                   custom_error_message=f"backbone.family must be {known}")]


def family_of(section) -> BackboneFamily:
    return FAMILIES[family_name(section)]


def build_backbone(section, progress: bool = True):
    """The frozen backbone a validated ``backbone`` section names (every failure is a UserError)."""
    return family_of(section).load(section, progress)
