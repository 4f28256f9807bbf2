"""Job specs: pydantic models loaded from YAML and checked before any Ray work starts.

Each job kind's module declares ``SPEC`` (a :class:`JobSpec` model) and ``run(spec, settings)``. Rules a type
cannot express are ``model_validator`` methods raising ``PydanticCustomError(..., {"key": k})``; :func:`from_dict`
turns pydantic's first error into one :class:`SpecError`. Parsing never touches storage: :func:`check_uris` does.
"""

from __future__ import annotations

import difflib
import importlib
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetCoreSchemaHandler, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import core_schema

from lesion_ray import storage

# Job kind -> module that runs it.
KINDS = {kind: f"lesion_ray.{kind}" for kind in ("synth", "train", "predict", "evaluate", "serve", "pipeline")}
DEFAULT_REGISTRY = "runs/registry"  # under the working directory, where neither spec nor cluster config names one


def default_registry() -> str:
    return storage.normalize(DEFAULT_REGISTRY)


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
    registry: str = field(default_factory=default_registry)

    def skip(self, uri: str) -> bool:
        """Whether ``uri`` is not checked now: an earlier step creates it, or it is on a remote cluster's disks."""
        if not self.check_local_paths and not storage.is_s3(uri):
            return True
        return any(storage.is_within(uri, p) for p in self.produced if not p.startswith("model:"))


class CheckedStr(str):
    """A string whose value is checked against the world (storage, registry) after parsing."""

    expected = "a string"

    @classmethod
    def canonical(cls, value: str) -> str:
        """The stored form of a value (URIs: absolute, so Ray workers in other folders agree)."""
        return value

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls._parse, core_schema.str_schema(min_length=1))

    @classmethod
    def _parse(cls, value: str) -> CheckedStr:
        try:
            return cls(cls.canonical(value))
        except storage.StorageError as exc:
            raise ValueError(str(exc)) from None

    def check(self, ctx: CheckContext) -> None:
        """Raise StorageError/ValueError when what the value names is unusable."""


class _Uri(CheckedStr):
    probe = staticmethod(storage.check_readable)
    canonical = classmethod(lambda cls, value: storage.normalize(value))

    def check(self, ctx: CheckContext) -> None:
        if not ctx.skip(self):
            self.probe(self)


class InputUri(_Uri):
    expected = "a path or URI (local, file:// or s3://) that exists"


class OutputUri(_Uri):
    expected = "a path or URI (local, file:// or s3://) to write to"
    probe = staticmethod(storage.check_writable)


class RegistryUri(_Uri):
    """Not probed: a job that reads it checks the model it names there, and train checks it can publish."""

    expected = "a path or URI (local, file:// or s3://) of a model registry"

    def check(self, ctx: CheckContext) -> None:
        pass


T = TypeVar("T")
# [low, high] and the like: YAML has lists only, and strict mode takes a list for a tuple in JSON alone.
Pair = Annotated[tuple[T, T], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) and len(v) == 2 else v)]
# What environment variables are named like; a token pasted in place of its variable's name (hex, base64) is not.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):  # never repeated: it may be the token
        raise ValueError("must be the NAME of an environment variable holding the token, in capitals (e.g. "
                         "LESION_RAY_TOKEN), never the token itself")
    return value


EnvName = Annotated[str, BeforeValidator(_env_name)]


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = Field(None, description="S3 region")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: str
    name: str
    storage: StorageSettings | None = None

    def check(self, ctx: CheckContext) -> None:
        """Check the URIs and models this spec names; a bare name@version is looked up in its own registry."""
        check_uris(self, replace(ctx, registry=getattr(self, "registry", None) or ctx.registry))

    def produces(self) -> list[str]:
        """What this job creates, which later pipeline steps may name: URIs and ``model:<name>``."""
        return [storage.normalize(uri) for _, uri in _checked(self, "") if isinstance(uri, OutputUri)]


# --- Parsing -------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in options)
        return text + (" (or null)" if len(options) < len(args) else "")
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} values [{', '.join(_describe(a) for a in args)}]"
    if origin is dict:
        return f"a mapping of names to {_plural(args[1])}"
    if isinstance(tp, type) and issubclass(tp, CheckedStr):
        return tp.expected
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping with keys " + ", ".join(tp.model_fields)
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


def _tags(model: Any) -> tuple[Any, ...]:
    """The ``kind`` values of a model in a union discriminated by ``kind`` (none for other types)."""
    kind = getattr(model, "model_fields", {}).get("kind")
    return typing.get_args(kind.annotation) if kind else ()


def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and ``| None``: the type whose members an error location names."""
    if typing.get_origin(tp) is Annotated:
        return _bare(typing.get_args(tp)[0])
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(options) == 1:
        return _bare(options[0])
    return tp


@dataclass
class _Place:
    """Where a pydantic error location points: in the declared types, in the data and as a key path."""

    tp: Any
    value: Any
    path: str
    field_path: str  # of the innermost model field: bounds are reported there, as for a whole [low, high]
    field: FieldInfo | None = None  # that field: its bounds as declared (pydantic's error has them as its type)
    union_depth: int | None = None  # location entries up to a union whose member's label comes next


def _locate(tp: Any, data: Any, path: str, loc: tuple[Any, ...]) -> _Place:
    place = _Place(tp, data, path, path)
    for depth, key in enumerate(loc):
        tp = _bare(place.tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and key in tp.model_fields:
            place.field = tp.model_fields[key]
            place.tp, place.path = place.field.annotation, key_path(place.path, key)
            place.field_path = place.path
        elif origin in (Union, types.UnionType):
            member = next((m for m in args if key in _tags(m)), None)
            if member is None:  # a member's label: the error is about the union as a whole
                place.union_depth = depth
                return place
            place.tp = member
            continue
        elif origin in (list, tuple, dict):
            place.tp = args[0] if origin is list else args[-1] if origin is dict else args[key]
            place.path = key_path(place.path, key)
        else:  # an unknown key, or a dict's key
            return place
        value = place.value
        in_list = isinstance(value, list) and isinstance(key, int) and key < len(value)
        place.value = value[key] if in_list else value.get(key) if isinstance(value, dict) else None
    return place


_BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most")}


def _spec_error(exc: ValidationError, tp: Any, data: Any, source: str, path: str) -> SpecError:
    """pydantic's first error as a :class:`SpecError` at its key path, worded as it always was."""
    errors = exc.errors()
    # Type errors before the rules of the models they are in (nested models run their rules first).
    error = min(errors, key=lambda e: "key" in e.get("ctx", {}))
    place = _locate(tp, data, path, error["loc"])
    if place.union_depth is not None:
        # An int or [min, max]: a member's bounds say more than "expected X or Y".
        prefix = error["loc"][: place.union_depth]
        error = next((e for e in errors if e["loc"][: len(prefix)] == prefix and e["type"] in _BOUNDS), error)
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _BOUNDS:
        bound_name, words = _BOUNDS[kind]
        metadata = place.field.metadata if place.field else []
        bound = next((getattr(m, bound_name) for m in metadata if hasattr(m, bound_name)), ctx[bound_name])
        got = float(error["input"]) if isinstance(ctx[bound_name], float) else error["input"]
        return SpecError(source, place.field_path, f"must be {words} {bound}, got {got!r}")
    if "key" in ctx:  # a model's rule, about one of its keys
        return SpecError(source, key_path(place.path, ctx["key"]), error["msg"])
    if kind == "extra_forbidden":
        model, key = _bare(place.tp), str(error["loc"][-1])
        close = difflib.get_close_matches(key, model.model_fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        allowed = ", ".join(model.model_fields)
        return SpecError(source, key_path(place.path, key), f"unknown key{hint}; allowed keys: {allowed}")
    if kind == "missing":
        return SpecError(source, place.path, f"missing required key: expected {_describe(place.tp)}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        expected = "one of " + ", ".join(repr(k) for m in typing.get_args(_bare(place.tp)) for k in _tags(m))
        text = f"expected {expected}, got {place.value.get('kind')!r}" if kind == "union_tag_invalid" else \
            f"missing required key: expected {expected}"
        return SpecError(source, key_path(place.path, "kind"), text)
    if kind == "value_error":
        return SpecError(source, place.path, str(ctx["error"]))
    return SpecError(source, place.path or "(top level)", f"expected {_describe(place.tp)}, got {place.value!r}")


def from_dict(tp: type[T] | Any, data: Any, source: str, path: str = "") -> T:
    """``data`` as ``tp`` (a model, or models discriminated by ``kind``); ``path``: where it is in ``source``."""
    try:
        return TypeAdapter(tp).validate_python(data, context={"source": source, "path": path})
    except ValidationError as exc:
        raise _spec_error(exc, tp, data, source, path) from None


def _checked(obj: Any, path: str) -> Iterator[tuple[str, CheckedStr]]:
    if isinstance(obj, CheckedStr):
        yield path, obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _checked(getattr(obj, name), key_path(path, name))
    elif isinstance(obj, (list, tuple, dict)):
        for key, value in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from _checked(value, key_path(path, key))


def check_uris(obj: Any, ctx: CheckContext, path: str = "") -> None:
    """Run every :class:`CheckedStr`'s check, turning storage errors into :class:`SpecError`."""
    for where, value in _checked(obj, path):
        try:
            value.check(ctx)
        except (storage.StorageError, ValueError) as exc:
            raise SpecError(ctx.source, where, str(exc)) from None


# --- Files and overrides --------------------------------------------------------------------


def read_yaml(source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(storage.read_text(source))
    except storage.StorageError as exc:
        raise SpecError(source, "", str(exc)) from None
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
        *parents, last = dotted.split(".")
        node: Any = data
        for depth, key in enumerate(parents):
            node = _child(node, key, ".".join(parents[: depth + 1]), source)
        if not isinstance(node, (dict, list)):
            raise SpecError(source, ".".join(parents), "cannot override inside a value that is not a mapping")
        node[_list_index(node, last, dotted, source) if isinstance(node, list) else last] = value
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
    if not isinstance(kind, str) or kind not in KINDS:
        raise SpecError(source, path, f"expected one of {', '.join(KINDS)}, got {kind!r}")
    return importlib.import_module(KINDS[kind])


def parse(data: dict[str, Any], source: str, path: str = "") -> JobSpec:
    """A raw mapping -> the kind's typed spec (types and cross-field rules, no URI checks)."""
    if not isinstance(data, dict):
        raise SpecError(source, path or "(top level)", "expected a mapping of keys to values")
    for key in ("kind", "name"):
        if key not in data:
            raise SpecError(source, key_path(path, key), "missing required key")
    # The kind picks the model (each kind's module imports what its job needs, e.g. torch, only when used).
    return from_dict(job_module(data["kind"], source, key_path(path, "kind")).SPEC, data, source, path)


def load(source: str, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and parse a spec file (URIs are checked by :func:`check_uris`)."""
    return parse(apply_overrides(read_yaml(source), overrides or [], source), source)
