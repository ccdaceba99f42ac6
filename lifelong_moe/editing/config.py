"""Configuration of an editing run (``lifelong-moe edit``) and of :meth:`Editor.from_config`.

Same conventions as :mod:`lifelong_moe.config`: YAML with ``extends``, dotted ``key=value``
overrides, ``variants``, unknown keys refused with a suggestion. ``method`` holds ``name`` plus the
method's own parameters, validated by its ``Params`` (:mod:`.registry`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..config import (OutputConfig, RuntimeConfig, Strict, apply_backbone_dtype, expand_variants,
                      format_validation_error, read_yaml_tree)
from ..errors import ConfigError
from ..families.vlm import VlmBackboneConfig
from .registry import validate_method


class EditMethodConfig(BaseModel):
    """``name`` picks a method of :data:`.registry.EDIT_METHODS`; the other keys go to its Params."""

    model_config = ConfigDict(extra="allow")
    name: str
    _params: Any = PrivateAttr(None)


class EditDataConfig(Strict):
    """Where the edit records come from. ``synthetic``: the offline MMEdit-style world
    (``streams.edit_synthetic.edit_records``), ``train`` records for meta-training and ``eval`` for
    editing. ``json``: E-VQA / E-IC / VLKEB files (``train_path`` optional, ``eval_path``), images
    resolved under ``image_root``; ``eval`` caps how many eval records are read (None: all)."""

    source: Literal["synthetic", "json"] = "synthetic"
    train: int = Field(0, ge=0)
    eval: Optional[int] = Field(1000, gt=0)
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    image_root: Optional[str] = None
    ignore_fields: list[str] = []  # extra fields of a real file to skip (unknown fields are errors)

    @model_validator(mode="after")
    def _paths(self) -> "EditDataConfig":
        if self.source == "json" and not self.eval_path:
            raise ValueError("a json edit source needs 'eval_path'")
        if self.source == "synthetic" and (self.train_path or self.eval_path or self.image_root):
            raise ValueError("train_path / eval_path / image_root are for source: json")
        return self


class EditEvalConfig(Strict):
    """The sequential protocol (LiveEdit's ``evaluate_sequential_edit``): for each edit count T, the
    eval records are cut into consecutive chunks of T (a trailing partial chunk dropped), at most
    ``max_chunks`` of them; per chunk: cache pre-edit outputs, apply T edits, test all T, restore.
    The accuracy matrix splits the largest count's first chunk into ``matrix_chunks`` parts applied in
    turn (row i: after parts 0..i; column j: reliability on part j)."""

    edit_counts: list[int] = [1, 10, 100, 1000]
    max_chunks: int = Field(10, gt=0)
    matrix_chunks: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    max_new_tokens: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _counts(self) -> "EditEvalConfig":
        if not self.edit_counts or any(c <= 0 for c in self.edit_counts):
            raise ValueError("edit_counts must be a non-empty list of positive integers")
        if sorted(set(self.edit_counts)) != list(self.edit_counts):
            raise ValueError(f"edit_counts must be increasing and distinct, got {self.edit_counts}")
        if self.matrix_chunks > self.edit_counts[-1]:
            raise ValueError(f"matrix_chunks {self.matrix_chunks} exceeds the largest edit count {self.edit_counts[-1]}")
        return self


class EditBackboneConfig(VlmBackboneConfig):
    family: Literal["vlm"] = "vlm"


class EditConfig(Strict):
    name: str = Field("edit", min_length=1)
    seed: int = Field(0, ge=0, lt=2**31)
    backbone: EditBackboneConfig = EditBackboneConfig()
    method: EditMethodConfig
    data: EditDataConfig = EditDataConfig()
    evaluation: EditEvalConfig = EditEvalConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    variants: Optional[list[dict[str, Any]]] = None

    def method_params(self) -> BaseModel:
        return self.method._params

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json", exclude={"variants"})
        d["method"] = {"name": self.method.name, **self.method_params().model_dump(mode="json", exclude={"name"})}
        return d


def validate_edit_config(data: dict) -> EditConfig:
    try:
        cfg = EditConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    apply_backbone_dtype(cfg)
    cfg.method._params = validate_method(cfg.method.name, cfg.method.model_dump())
    return cfg


def load_edit_config(source: str | Path | dict, overrides: list[str] | None = None,
                     only: list[str] | None = None) -> list[EditConfig]:
    """One EditConfig per variant (or one), from a YAML path or an already-read mapping."""
    if isinstance(source, dict):
        base = dict(source)
        base.setdefault("name", "edit")
    else:
        base = read_yaml_tree(source)
        base.setdefault("name", Path(source).stem)
    # a variant's method replaces the base's (other methods' params would not validate)
    return expand_variants(base, overrides, only, validate_edit_config, replaced=("method",))
