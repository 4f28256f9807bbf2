"""Job specs: typed dataclasses loaded from YAML and checked before any Ray work starts.

Each job kind's module declares ``SPEC`` (a :class:`JobSpec` dataclass) and ``run(spec, settings)``
(:class:`lesion_ray.settings.Settings`: where the job's storage and registry are).
Type hints are the schema: unknown keys, wrong types, impossible values and unreachable
URIs all become one :class:`SpecError` naming the file, the key path and what is expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from lesion_ray import storage

# Job kind -> module that runs it (one module per kind).
KINDS: dict[str, str] = {
    "synth": "lesion_ray.synth",
    "train": "lesion_ray.train",
    "predict": "lesion_ray.predict",
    "evaluate": "lesion_ray.evaluate",
    "serve": "lesion_ray.serve",
    "pipeline": "lesion_ray.pipeline",
}
DEFAULT_REGISTRY = "runs/registry"  # under the working directory, where neither spec nor cluster config names one


class SpecError(Exception):
    """A user's mistake in a spec or cluster config (the CLI exits with status 2)."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source, self.path, self.message = source, path, message
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")


@dataclass
class CheckContext:
    """What URI checks know: where the spec came from and what earlier steps will create."""

    source: str
    produced: list[str] = field(default_factory=list)
    # On a remote cluster local paths name the cluster's disks, which we cannot see.
    check_local_paths: bool = True
    # Where a bare name@version is looked up: the job's registry (Settings.registry).
    registry: str = field(default_factory=lambda: storage.normalize(DEFAULT_REGISTRY))

    def will_exist(self, uri: str) -> bool:
        if uri in self.produced:
            return True
        return any(storage.is_within(uri, p) for p in self.produced if not p.startswith("model:"))

    def skip(self, uri: str) -> bool:
        return self.will_exist(uri) or (not self.check_local_paths and not storage.is_s3(uri))


class CheckedStr(str):
    """A string whose value is checked against the world (storage, registry) after parsing."""

    expected = "a string"

    @classmethod
    def canonical(cls, value: str) -> str:
        """The stored form of a value (URIs: absolute, so Ray workers in other folders agree)."""
        return value

    def check(self, ctx: CheckContext) -> None:
        """Raise StorageError/ValueError when what the value names is unusable."""


class _Uri(CheckedStr):
    """A storage URI, stored absolute; ``probe`` says whether the job can use it."""

    probe = staticmethod(storage.check_readable)
    canonical = classmethod(lambda cls, value: storage.normalize(value))

    def check(self, ctx: CheckContext) -> None:
        if not ctx.skip(self):
            self.probe(self)


class InputUri(_Uri):
    """A path or URI the job reads: it must exist and be readable."""

    expected = "a path or URI (local, file:// or s3://) that exists"


class OutputUri(_Uri):
    """A path or URI the job writes: its bucket, or its nearest existing folder, must be writable."""

    expected = "a path or URI (local, file:// or s3://) to write to"
    probe = staticmethod(storage.check_writable)


class RegistryUri(_Uri):
    """A model registry, the ``registry`` key of specs and cluster configs. Not probed on its own: a job
    that reads it checks the model it names there, and train checks that it can publish there."""

    expected = "a path or URI (local, file:// or s3://) of a model registry"

    def check(self, ctx: CheckContext) -> None:
        pass


def param(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
          help: str = "") -> Any:
    """A spec field with bounds and a help text (the bounds are checked on load)."""
    meta = {"min": min, "max": max, "help": help}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class StorageSettings:
    endpoint_url: str | None = param(None, help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = param(None, help="S3 region")


@dataclass(kw_only=True)
class JobSpec:
    """Keys every job spec has."""

    kind: str
    name: str
    storage: StorageSettings | None = None

    def validate(self, source: str, path: str) -> None:
        """Cross-field rules a type cannot express; raise :class:`SpecError` with ``path``."""

    def check(self, ctx: CheckContext) -> None:
        """Check the world this spec names (URIs, models) without running anything."""
        check_uris(self, ctx)

    def produces(self) -> list[str]:
        """What this job creates, so later pipeline steps may name it before it exists:
        normalized URIs (by default every :class:`OutputUri` field) and ``model:<name>``."""
        return outputs_of(self)


# --- Parsing -------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in args)
        return text + (" (or null)" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} values [{', '.join(_describe(a) for a in args)}]"
    if origin is dict:
        return f"a mapping of names to {_plural(typing.get_args(tp)[1])}"
    if isinstance(tp, type) and issubclass(tp, CheckedStr):
        return tp.expected
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    text = _describe(tp)
    for article in ("an ", "a "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text


def key_path(path: str, key: str | int) -> str:
    """The dotted key path of ``key`` under ``path`` (``steps[1].epochs``), for error messages."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    def fail() -> typing.NoReturn:
        raise SpecError(source, path, f"expected {_describe(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path, source)
            except SpecError as exc:
                # A nested mapping's own error is more useful than "expected X or Y".
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise exc from None
        fail()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        fail()
    if origin is list:
        if not isinstance(value, list):
            fail()
        (item,) = typing.get_args(tp)
        return [_convert(item, v, key_path(path, i), source) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail()
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, key_path(path, i), source) for i, (a, v) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, key_path(path, str(k)), source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return from_dict(tp, value, source, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail()
    if isinstance(tp, type) and issubclass(tp, str):
        if not isinstance(value, str) or (not value and tp is not str):
            fail()
        if issubclass(tp, CheckedStr):
            try:
                return tp(tp.canonical(value))
            except (storage.StorageError, ValueError) as exc:
                raise SpecError(source, path, str(exc)) from None
        return tp(value)
    raise TypeError(f"unsupported spec type {tp!r} at {path}")


def _check_bounds(f: dataclasses.Field, value: Any, path: str, source: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    numbers = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    if isinstance(value, (list, tuple)):
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for number in numbers:
        if lo is not None and number < lo:
            raise SpecError(source, path, f"must be at least {lo}, got {number!r}")
        if hi is not None and number > hi:
            raise SpecError(source, path, f"must be at most {hi}, got {number!r}")


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], source: str, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, converting and checking every key."""
    if not isinstance(data, dict):
        raise SpecError(source, path or "(top level)", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            allowed = ", ".join(fields)
            raise SpecError(source, key_path(path, str(key)), f"unknown key{hint}; allowed keys: {allowed}")
    values = {}
    for name, f in fields.items():
        where = key_path(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(source, where, f"missing required key: expected {_describe(hints[name])}")
            continue
        values[name] = _convert(hints[name], data[name], where, source)
        _check_bounds(f, values[name], where, source)
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """A spec as plain YAML-able data (the inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, str):
        return str(obj)
    return obj


def check_uris(obj: Any, ctx: CheckContext, path: str = "") -> None:
    """Run every :class:`CheckedStr`'s check, turning storage errors into :class:`SpecError`."""
    if isinstance(obj, CheckedStr):
        try:
            obj.check(ctx)
        except (storage.StorageError, ValueError) as exc:
            raise SpecError(ctx.source, path, str(exc)) from None
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            check_uris(getattr(obj, f.name), ctx, key_path(path, f.name))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_uris(v, ctx, key_path(path, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_uris(v, ctx, key_path(path, k))


def outputs_of(obj: Any) -> list[str]:
    """Every :class:`OutputUri` in a spec: what a later pipeline step may read."""
    if isinstance(obj, OutputUri):
        return [storage.normalize(obj)]
    if dataclasses.is_dataclass(obj):
        return [u for f in dataclasses.fields(obj) for u in outputs_of(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [u for v in obj for u in outputs_of(v)]
    return []


# --- Files and overrides --------------------------------------------------------------------


def read_yaml(source: str) -> dict[str, Any]:
    try:
        text = storage.read_text(source)
    except storage.StorageError as exc:
        raise SpecError(source, "", str(exc)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, where, f"not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(source, "(top level)", "expected a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML); pipeline steps by name."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(source, item, "an override must look like dotted.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        keys = dotted.split(".")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]), source)
        if isinstance(node, list):
            node[_list_index(node, keys[-1], dotted, source)] = value
        else:
            node[keys[-1]] = value
    return data


def _child(node: Any, key: str, path: str, source: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, path, source)]
    if not isinstance(node, dict):
        raise SpecError(source, path, "cannot override inside a value that is not a mapping")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _list_index(node: list, key: str, path: str, source: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    names = [str(i.get("name")) for i in node if isinstance(i, dict)]
    raise SpecError(source, path, f"no list item named '{key}' (have: {', '.join(names)})")


def job_module(kind: Any, source: str, path: str = "kind") -> types.ModuleType:
    if kind not in KINDS:
        raise SpecError(source, path, f"expected one of {', '.join(KINDS)}, got {kind!r}")
    return importlib.import_module(KINDS[kind])


def parse(data: dict[str, Any], source: str, path: str = "") -> JobSpec:
    """A raw mapping -> the kind's typed spec (types and cross-field rules, no URI checks)."""
    if not isinstance(data, dict):
        raise SpecError(source, path or "(top level)", "expected a mapping of keys to values")
    for key in ("kind", "name"):
        if key not in data:
            raise SpecError(source, key_path(path, key), "missing required key")
    module = job_module(data["kind"], source, key_path(path, "kind"))
    spec = from_dict(module.SPEC, data, source, path)
    spec.validate(source, path)
    return spec


def load(source: str, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and parse a spec file (URIs are checked by :func:`check_uris`)."""
    return parse(apply_overrides(read_yaml(source), overrides or [], source), source)
