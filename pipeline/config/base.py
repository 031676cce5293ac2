"""The machinery every section shares: validation of typed fields, building sections from params.yaml, --set
overrides, saving; the field types that several sections use (paths, dtypes, bit widths, LoRA).

Each stage loads only the sections it reads (`load_sections` with its own `*Params` class, e.g.
pipeline/config/cache.py's `CacheParams` = seed + data + cache), so in DVC a stage depends on the modules of its own
sections and nothing else: adding a Stage-2 option never marks Stage 1 as changed. `Config`
(pipeline/config/params.py) is the whole file, for the planner, the ablation and the tests.

Every value is checked when a dataclass is built (from YAML, from `--set`, or in code): its type from the
annotation (a `Literal` lists the allowed choices) by one generic validator, `check_fields`, and its range by
each section's `__post_init__`. A typo thus fails in well under a second, naming the field and what it allows,
before torch is imported or a model loads. Attributes assigned after construction are not re-checked; saving and
reloading the config (what every stage CLI does) checks them.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml

from cache.errors import OtkdError

SECTIONS = ("seed", "prepare", "data", "finetune", "cache", "distill", "evaluate")
"""The top-level keys of params.yaml (pipeline/config/params.py's `Config`); a stage that reads only some of them
still refuses any other key, so a misspelt section fails in every stage."""


class ConfigError(OtkdError, ValueError):
    """A parameter is unknown, of the wrong type, or out of its allowed range (the message names it)."""


NON_EMPTY = "non-empty"
PathStr = Annotated[str, NON_EMPTY]
"""A local path or a hub model name: any string but the empty one (an empty path would silently mean the current
directory)."""
Bits = Literal[4, 8, 16]
"""How a model's weights are loaded with bitsandbytes: 4 (NF4, double quantisation), 8 (LLM.int8) or 16 (not
quantised: the checkpoint's own weights in `dtype`)."""
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
"""Compute dtype of a loaded model (also the 4-bit compute dtype): "auto" = bf16 on a GPU that supports it, fp32
on the CPU (bf16 matmuls are slow there); or "bf16", "fp16", "fp32" explicitly."""


def check_value(hint, value, name: str):
    """`value` checked against the annotation `hint`; returned normalised (an int where a float is expected becomes
    a float, a tuple where a list is expected a list), so that a config compares and saves the same however it
    was written."""
    extras = ()
    if get_origin(hint) is Annotated:
        hint, *extras = get_args(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        # type must match too: True == 1 and 16.0 == 16, but neither is a valid choice
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [check_value(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {
            check_value(args[0], k, f"{name} key"): check_value(args[1], v, f"{name}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(f"{name} must be a {hint.__name__}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            hint_1e = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint_1e = " (YAML reads 1e-4 as a string: write 1.0e-4)"
                except ValueError:
                    pass
            raise ConfigError(f"{name} must be a finite number, got {value!r}{hint_1e}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if NON_EMPTY in extras and not value.strip():
        raise ConfigError(f"{name} must not be empty")
    return value


@functools.cache
def field_hints(cls) -> dict:
    return get_type_hints(cls, include_extras=True)


def check_fields(obj) -> None:
    """The generic half of validation, run first by every section's __post_init__: each field against its type
    annotation (Literal choices, numbers, strings, lists, mappings, nested sections), normalised in place."""
    hints = field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(hints[f.name], value, f.name)
        if checked is not value:
            setattr(obj, f.name, checked)


def require(ok: bool, name: str, what: str, value: Any) -> None:
    """The explicit half: one range rule, e.g. require(k >= 1, "k", ">= 1", k)."""
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def fraction(obj, *names: str) -> None:
    for n in names:
        require(0 <= getattr(obj, n) < 1, n, "in [0, 1)", getattr(obj, n))


def at_least(obj, low: int, *names: str) -> None:
    for n in names:
        require(getattr(obj, n) >= low, n, f">= {low}", getattr(obj, n))


def positive(obj, *names: str) -> None:
    for n in names:
        require(getattr(obj, n) > 0, n, "> 0", getattr(obj, n))


@dataclass(slots=True)
class LoraSettings:
    """LoRA adapters (Hu et al. 2021) as peft builds them: the teacher's SFT (`finetune.lora`) and the student's
    Stage 2 (`distill.lora`) share these fields, with their own defaults; used only with mode=lora."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Modules that get LoRA adapters: all attention and MLP projections (names of Qwen2/Llama-style blocks). Every
    linear layer, not attention alone: QLoRA (Dettmers et al. 2023) found that this is what matches full fine-tuning."""

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "r", "alpha")
        fraction(self, "dropout")
        require(bool(self.target_modules), "target_modules", "a non-empty list", self.target_modules)


def default(cls, name: str):
    """The default value of field `name` of dataclass `cls` (calling its factory)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def unknown_parameter(cls, where: str, name: str, known) -> ConfigError:
    """The error for a key `cls` does not have: the new name when the key was renamed (`cls.RENAMED`, old name ->
    new dotted name within the section), else the known names."""
    prefix = where + "." if where else ""
    new = getattr(cls, "RENAMED", {}).get(name)
    if new:
        return ConfigError(f"{prefix}{name} was renamed: set {prefix}{new} instead")
    return ConfigError(f"unknown parameter {prefix}{name} (known: {', '.join(sorted(known))})")


def build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors, and
    every value is validated (by the dataclasses' __post_init__) with its full dotted name in the message."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {values!r}")
    hints = field_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise unknown_parameter(cls, where, unknown[0], names)
    kwargs = {}
    for name, value in values.items():
        t = hints[name]
        if dataclasses.is_dataclass(t) and not isinstance(value, t):
            if isinstance(value, dict):
                # missing keys of a nested group take the *section's* default (distill.lora's alpha is 32, the
                # LoraSettings class default 16), not the group class's
                value = {**dataclasses.asdict(default(cls, name)), **value}
            value = build(t, value, f"{where}.{name}".strip("."))  # a non-mapping fails there, named
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by cls's own checks, which know only the field's name in cls
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def _coerce(text: str, current: Any):
    """Parse an override string as the type of the field it replaces (YAML for lists and mappings)."""
    if isinstance(current, str):  # paths and names stay verbatim ("007" is not 7)
        return text
    try:
        if isinstance(current, bool):
            value = yaml.safe_load(text)
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)  # also "1e-4", which YAML 1.1 would read as a string
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"expected a value like {current!r}, got {text!r}") from None


def apply_overrides(cfg, overrides: list[str]):
    """Apply `section.field=value` strings (the CLI's --set; `distill.lora.r=8` reaches into a group) to a
    config, in place, and validate the result as a whole (so a choice or range error names the field).

    Works on a plain-dict copy and rebuilds the dataclasses from it: __post_init__'s checks run again, and
    `cfg` is left unchanged if any override is invalid."""
    values = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        *parents, leaf = key.strip().split(".")
        top = (parents or [leaf])[0]
        if top in SECTIONS and top not in values:
            raise ConfigError(f"{key}: this stage does not read the {top!r} section (it reads {', '.join(values)})")
        obj, node = cfg, values  # obj: which names exist (dataclass fields); node: the values being edited
        for p in parents:
            if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
                raise ConfigError(f"unknown parameter {key}")
            obj, node = getattr(obj, p), node[p]
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            if dataclasses.is_dataclass(obj) and leaf in getattr(type(obj), "RENAMED", {}):
                raise unknown_parameter(type(obj), ".".join(key.strip().split(".")[:-1]), leaf, ())
            raise ConfigError(f"unknown parameter {key}")
        try:
            value = _coerce(text, node[leaf])
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        if dataclasses.is_dataclass(getattr(obj, leaf)) and isinstance(value, dict):
            value = {**node[leaf], **value}  # --set distill.lora='{r: 8}' keeps the group's other values
        node[leaf] = value
    new = build(type(cfg), values, "")
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(new, f.name))
    return cfg


def load_sections(cls, path: str | Path = "params.yaml", overrides: list[str] = ()):
    """The sections of params.yaml that dataclass `cls` has as fields (missing ones take their defaults), with CLI
    overrides applied, validated. Other known sections are left unread; an unknown top-level key is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {values!r}")
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown parameter {unknown[0]} (known: {', '.join(sorted(SECTIONS))})")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        cfg = build(cls, {k: v for k, v in values.items() if k in names}, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (or one section of it) as YAML next to a stage's output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
