"""Run configuration: YAML (with ``extends``) + dotted ``key=value`` overrides -> a typed schema.

Validation is pydantic's; this module only formats its errors so that each names the full key path,
and suggests the closest known key for a typo.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .families import DEFAULT_FAMILY, FAMILIES, backbone_section
from .registry import TASK_KINDS, strategy_params_class
from .schema import PositiveInt, Strict, Template


class SplitSizes(Strict):
    """Deterministic subsampling: at most this many samples per class (None keeps all)."""

    train: Optional[int] = Field(None, gt=0)
    test: Optional[int] = Field(None, gt=0)


class SourceSpec(Strict):
    """One dataset of a stream: a source name plus where its files are."""

    dataset: str
    path: Optional[str] = None
    name: Optional[str] = None
    templates: Optional[list[Template]] = Field(None, min_length=1)
    samples_per_class: Optional[SplitSizes] = None  # this dataset's own sizes; unset fields: the stream's


class StreamConfig(Strict):
    kind: Literal[tuple(TASK_KINDS)]
    root: Optional[str] = None
    download: bool = False
    test_fraction: float = Field(0.2, gt=0, lt=1)
    samples_per_class: SplitSizes = SplitSizes()
    # class_incremental
    dataset: Optional[Union[str, SourceSpec]] = None
    num_experiences: Optional[int] = Field(None, gt=0)
    classes_per_experience: Optional[list[PositiveInt]] = Field(None, min_length=1)
    class_order: Union[Literal["seed", "natural"], list[int]] = "seed"
    # multi_domain
    domains: Optional[list[Union[str, SourceSpec]]] = Field(None, min_length=1)
    order: Optional[str] = None
    # an ImageFolder image that cannot be decoded: refuse the stream (listing them) or leave it out
    on_bad_image: Literal["error", "skip"] = "error"
    # vqa: one experience per question type (dataset: synthetic_vqa | vqacl; order: vqacl or question_types)
    question_types: Optional[list[str]] = None
    partition_dir: Optional[str] = None  # vqacl: where the per-question-type JSON lists are (default: root)
    questions_per_type: SplitSizes = SplitSizes()  # deterministic subsampling of each task's questions
    # vqa: an answer word the tiny VLM's closed vocabulary lacks (it would be <unk>): refuse the stream or warn
    on_unknown_answer: Literal["error", "warn"] = "error"

    @model_validator(mode="after")
    def _kind_fields(self) -> "StreamConfig":
        if self.kind == "class_incremental":
            if self.dataset is None:
                raise ValueError("a class_incremental stream needs 'dataset'")
            if (self.num_experiences is None) == (self.classes_per_experience is None):
                raise ValueError("give exactly one of 'num_experiences' and 'classes_per_experience'")
        elif self.kind == "multi_domain":
            if (self.domains is None) == (self.order is None):
                raise ValueError("a multi_domain stream needs exactly one of 'domains' and 'order'")
        else:
            if self.dataset is None:
                raise ValueError("a vqa stream needs 'dataset' (synthetic_vqa or vqacl)")
            if (self.question_types is None) == (self.order is None):
                raise ValueError("a vqa stream needs exactly one of 'question_types' and 'order'")
        return self

    @property
    def task_kind(self) -> str:
        """What an experience asks: ``classification`` (CLIP streams) or ``vqa`` (answer generation)."""
        return TASK_KINDS[self.kind]


AnyBackbone = backbone_section()


class OptimizerConfig(Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)


class ScheduleConfig(Strict):
    name: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class TrainingConfig(Strict):
    epochs: int = Field(1, gt=0)
    iterations: Optional[int] = Field(None, gt=0)  # when set, overrides epochs
    batch_size: int = Field(32, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    lr_per_experience: Optional[list[Annotated[float, Field(gt=0)]]] = Field(None, min_length=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    label_space: Literal["task", "seen"] = "task"
    prompt: Literal["first", "ensemble"] = "first"
    augment: Literal["none", "clip"] = "none"  # clip: CLIP's train transform (random resized crop)
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(1, gt=0)


class EvaluationConfig(Strict):
    batch_size: int = Field(256, gt=0)
    label_space: Literal["task", "seen", "all"] = "task"
    prompt: Literal["first", "ensemble"] = "ensemble"
    zero_shot_row: bool = True
    # vqa streams: the matrix entry (auto: VQA soft accuracy where records carry 10 human answers, else
    # exact match of the greedy answer); every answer metric is recorded in results.json either way
    answer_metric: Literal["auto", "exact_match", "vqa_accuracy", "token_accuracy"] = "auto"
    max_new_tokens: int = Field(8, gt=0)


class StrategyConfig(BaseModel):
    """``name`` picks a file under ``strategies/``; the other keys are validated by its Params."""

    model_config = ConfigDict(extra="allow")
    name: str
    _params: Any = PrivateAttr(None)


class OutputConfig(Strict):
    dir: str = "runs/{name}"
    checkpoints: bool = True

    @field_validator("dir")
    @classmethod
    def _dir_placeholders(cls, v: str) -> str:
        try:
            v.format(name="run")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"{v!r}: '{{name}}' is the only placeholder it may hold ({e!r})") from None
        return v


class RuntimeConfig(Strict):
    """How a run uses the machine. ``threads`` is torch's intra-op thread count for the run (None:
    torch's default); results may differ in the last bits between thread counts, so a config that
    sets it gives the same numbers wherever it runs. ``jobs``: variants of one file run at once, each
    in its own process (the CLI's ``--jobs`` overrides it); set ``threads`` with it, e.g. jobs 2 x 1
    thread on 2 cores.

    ``device``: ``auto`` (the first CUDA device if torch sees one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``; a device that is not available is an error before anything is written. With
    ``jobs > 1`` every variant's process uses this same device: on one GPU they share its memory and
    compute. ``precision``: ``fp32``, or ``bf16`` / ``fp16`` mixed precision (autocast around forward
    passes, trainable weights and optimiser state kept in fp32, fp16 with a loss scaler); see
    :mod:`lifelong_moe.runtime.device`. A VLM whose frozen weights are stored in half precision
    (``backbone.dtype: bf16 | fp16``) computes under autocast in that dtype: ``precision`` defaults to it
    and may not differ (:func:`apply_backbone_dtype`). ``auto`` is the CPU on a machine without a GPU,
    and CPU fp32 runs compute exactly what they did before these settings existed."""

    threads: Optional[int] = Field(None, ge=1, le=1024)  # torch's OpenMP pool segfaults at 100000
    jobs: int = Field(1, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class WandbConfig(Strict):
    """A Weights & Biases run per results directory (``wandb.init`` arguments); ``mode: offline``
    writes it locally for ``wandb sync`` later."""

    project: str = Field(min_length=1)
    mode: Literal["online", "offline", "disabled"] = "offline"
    entity: Optional[str] = None
    dir: Optional[str] = None  # None: $WANDB_DIR, else the working directory
    tags: Optional[list[str]] = None


class LoggingConfig(Strict):
    """Optional experiment trackers, off by default: per-step loss / lr, every matrix row and metric
    (:mod:`lifelong_moe.runs.trackers`). The results directory stays the record of the run."""

    tensorboard: Optional[str] = None  # event files under <tensorboard>/<name>/seed<seed>
    wandb: Optional[WandbConfig] = None


class RunConfig(Strict):
    name: str = Field("run", min_length=1)
    seed: int = Field(0, ge=0, lt=2**31)  # numpy seeds are 0..2**32-1; per-experience seeds add to it
    stream: StreamConfig
    backbone: AnyBackbone = FAMILIES[DEFAULT_FAMILY].config()
    strategy: StrategyConfig
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    logging: LoggingConfig = LoggingConfig()
    variants: Optional[list[dict[str, Any]]] = None  # each: {name: ..., <partial config>}

    def strategy_params(self) -> BaseModel:
        return self.strategy._params  # set by load_config

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json", exclude={"variants"})
        d["strategy"] = {"name": self.strategy.name, **self.strategy_params().model_dump(mode="json", exclude={"name"})}
        return d


# ----------------------------------------------------------------------------------------- loading
def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file, resolving ``extends: other.yaml`` (a path or list, relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("extends", None) or []
    if not (isinstance(bases, str) or isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: 'extends' must be a file name or a list of them, got {bases!r}")
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml_tree(path.parent / b, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``a.b.c=value`` overrides; values are parsed as YAML (``lr=1e-3``, ``x=[1,2]``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        raw = [p for i, p in enumerate(e["loc"]) if not (i and e["loc"][i - 1] == "backbone" and p in FAMILIES)]
        loc = [f"[{p}]" if isinstance(p, int) else str(p) for p in raw]  # (the family tag is not a key)
        path = ".".join(([prefix] if prefix else []) + loc).replace(".[", "[") or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{path}: {msg}")
    return "invalid configuration: " + "; ".join(lines)  # one line: the CLI prints it as is


TASK_PHRASES = {"classification": "is classification", "vqa": "asks questions"}


def apply_backbone_dtype(cfg) -> None:
    """``runtime.precision`` of a config whose backbone stores its weights in ``backbone.dtype`` (VLMs):
    that dtype when the key is not given; a half-precision backbone under another precision is a
    ConfigError (:func:`lifelong_moe.runtime.device.resolve_precision`)."""
    from .errors import UserError
    from .runtime.device import resolve_precision

    dtype = getattr(cfg.backbone, "dtype", "fp32")
    given = cfg.runtime.precision if "precision" in cfg.runtime.model_fields_set else None
    try:
        precision = resolve_precision(dtype, given)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if precision != cfg.runtime.precision:
        cfg.runtime = cfg.runtime.model_copy(update={"precision": precision})


def validate(data: dict) -> RunConfig:
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    apply_backbone_dtype(cfg)
    family = FAMILIES[cfg.backbone.family]
    if cfg.stream.task_kind != family.task_kind:
        answers = [f.name for f in FAMILIES.values() if f.task_kind == cfg.stream.task_kind]
        raise ConfigError(f"stream.kind {cfg.stream.kind!r} {TASK_PHRASES[cfg.stream.task_kind]}: it needs "
                          f"backbone.family: {' or '.join(answers)}, got backbone.family {cfg.backbone.family!r}")
    params_cls = strategy_params_class(cfg.strategy.name, cfg.backbone.family)
    try:
        cfg.strategy._params = params_cls.model_validate(cfg.strategy.model_dump())
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix="strategy")) from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None) -> list[RunConfig]:
    """Load, merge and validate a config; one RunConfig per variant (or just one). ``only`` keeps
    the named variants (before overrides apply, so an override may name a key only they have)."""
    base = read_yaml_tree(path)
    base.setdefault("name", Path(path).stem)
    return expand_variants(base, overrides, only, validate)


def expand_variants(base: dict, overrides: list[str] | None, only: list[str] | None, validate_fn,
                    replaced: tuple[str, ...] = ()) -> list:
    """``validate_fn`` of each variant of ``base`` (its ``variants:`` list, each merged over the rest;
    keys in ``replaced`` are taken whole from the variant, not merged), ``overrides`` applied after
    the merge; ``only`` keeps the named variants. Without ``variants:``, ``[validate_fn(base)]``."""
    base = dict(base)
    overrides = list(overrides or [])
    if any(o.partition("=")[0].strip().split(".")[0] == "variants" for o in overrides):
        raise ConfigError("variants cannot be set by an override; edit them in the file (and pick some with --only)")
    variants = base.pop("variants", None)
    if variants is None:
        return [validate_fn(apply_overrides(base, overrides))]
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "name" in v for v in variants):
        raise ConfigError("variants: must be a list of mappings, each with a 'name'")
    names = [str(v["name"]) for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: names must be unique, got {names}")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ConfigError(f"--only: no variant named {', '.join(map(repr, unknown))}; variants: {', '.join(names)}")
        variants = [v for v in variants if str(v["name"]) in only]
    out = []
    for v in variants:
        v = dict(v)
        vname = str(v.pop("name"))
        merged = deep_merge(base, v)
        for key in replaced:
            if key in v:
                merged[key] = v[key]
        merged["name"] = f"{base['name']}/{vname}"
        try:
            out.append(validate_fn(apply_overrides(merged, overrides)))
        except ConfigError as e:
            raise ConfigError(f"variant {vname!r}: {e}") from None
    return out
