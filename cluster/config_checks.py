"""Checks behind the config models, and config problems as one clear line each.

A :class:`ConfigError` line reads ``FILE: key.path[0].name: what is wrong``. Pydantic's errors are
translated here (key paths in ``a.b[0].c`` form, friendlier wording, the accepted keys for an
unknown one). Validators that need a precise key path raise :func:`problems_error`, which
pydantic merges into its own error list with the path prefixed. Also here: the value checks of
the ``cluster`` section, YAML reading (duplicate keys are errors) and flow signature checks.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from actors.entrypoint import load_flow
from actors.errors import FlowLoadError, LedgerError, ListenerError
from actors.ledger.target import parse as parse_target

Loc = tuple[str | int, ...]
DEFAULT_TENANT = "default"  # the tenant of flows that name none; implicit unless declared

# Our own error type: the message is already complete, no "(got ...)" suffix is added.
_CUSTOM = "config"
_NO_INPUT_SUFFIX = {_CUSTOM, "value_error", "missing", "extra_forbidden", "assertion_error"}
_MODEL_TYPE = re.compile(r"a valid dictionary( or instance of \w+)?")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")


class ConfigError(ListenerError):
    """An invalid config. ``problems`` holds ``(key path, message)`` pairs, most relevant first."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems) or [("", "invalid config")]
        super().__init__("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        return [
            f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}"
            for path, msg in self.problems
        ]


def problems_error(title: str, problems: Iterable[tuple[Loc, str]]) -> ValidationError:
    """A ValidationError with one custom error per ``(loc, message)``, for use in validators."""
    details = [
        InitErrorDetails(
            type=PydanticCustomError(_CUSTOM, "{message}", {"message": message}),
            loc=loc,
            input=None,
        )
        for loc, message in problems
    ]
    return ValidationError.from_exception_data(title, details)


def key_path(loc: Loc) -> str:
    """``("flows", 0, "clocks", 1, "cron")`` → ``flows[0].clocks[1].cron``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def translate(exc: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """Turn pydantic's errors into ``(key path, message)`` pairs, without duplicates."""
    seen: set[tuple[str, str]] = set()
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        item = (key_path(loc), _message(err, loc, root))
        if item not in seen:
            seen.add(item)
            problems.append(item)
    return problems


def _message(err: Any, loc: Loc, root: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        return "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    msg = str(err["msg"])
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif msg.startswith("Input should be"):
        msg = "must be" + msg.removeprefix("Input should be")
    elif msg.startswith("List should have"):
        msg = "must have" + msg.removeprefix("List should have")
    msg = _MODEL_TYPE.sub("a mapping", msg)
    if kind not in _NO_INPUT_SUFFIX:
        msg += f" (got {_short(err.get('input'))})"
    return msg[:1].lower() + msg[1:] if not msg[:2].isupper() else msg


def _short(value: Any) -> str:
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(root: type[BaseModel], loc: Loc) -> list[str]:
    """The field names of the model found by walking ``loc`` down from ``root``."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``list[X]``, ``X | None``; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


# --- cross-references (run on a validated ClusterConfig) ------------------------------------


def duplicate_problems(config: Any) -> list[tuple[Loc, str]]:
    """Repeated tenant or flow names (reported at the repeat) and undeclared tenants."""
    problems: list[tuple[Loc, str]] = []
    tenants: dict[str, int] = {}
    for i, tenant in enumerate(config.tenants):
        first = tenants.setdefault(tenant.name, i)
        if first != i:
            msg = f"tenant {tenant.name!r} is already declared at tenants[{first}]"
            problems.append((("tenants", i, "name"), msg))
    flows: dict[str, int] = {}
    for i, flow in enumerate(config.flows):
        first = flows.setdefault(flow.ref, i)
        if first != i:
            msg = (
                f"flow {flow.name!r} of tenant {flow.tenant!r} is already defined at flows[{first}]"
            )
            problems.append((("flows", i, "name"), msg))
        if flow.tenant != DEFAULT_TENANT and flow.tenant not in tenants:
            declared = ", ".join(sorted(tenants)) or "none"
            msg = f"tenant {flow.tenant!r} is not declared under tenants (declared: {declared})"
            problems.append((("flows", i, "tenant"), msg))
    return problems


def quota_problems(config: Any) -> list[tuple[Loc, str]]:
    clocks = Counter[str]()
    for flow in config.flows:
        clocks[flow.tenant] += len(flow.clocks)
    problems: list[tuple[Loc, str]] = []
    declared: dict[str, int] = {}
    for i, t in enumerate(config.tenants):
        declared.setdefault(t.name, i)
    for tenant in config.all_tenants():
        limit = tenant.quotas.max_listeners
        if clocks[tenant.name] > limit:
            i = declared.get(tenant.name)
            loc: Loc = ("tenants", i, "quotas", "max_listeners") if i is not None else ("flows",)
            count = clocks[tenant.name]
            problems.append((loc, f"tenant {tenant.name!r} has {count} clocks, over its {limit}"))
    return problems


def option_for_message(options: dict[str, Any], message: str) -> Loc:
    """The option key a clock's ``check_options`` message is about, if one stands out."""
    for key in options:
        if f"option {key!r}" in message or message.startswith((f"{key}:", f"{key!r}")):
            return (key,)
    named = [key for key in options if re.search(rf"\b{re.escape(key)}\b", message)]
    return (named[0],) if len(named) == 1 else ()


# --- values of the cluster section ----------------------------------------------------------


def check_ledger(value: str) -> str:
    if value == "sqlite" or (value.startswith("sqlite:///") and len(value) > 10):
        return value
    parts = urlsplit(value)
    if parts.scheme in ("redis", "rediss", "postgresql", "postgres") and parts.netloc:
        try:  # ?namespace= must be a plain name; the state dir only matters without it
            parse_target(value, ".", (parts.scheme,))
        except LedgerError as exc:
            raise ValueError(str(exc)) from None
        return value
    raise ValueError(
        f"{value!r} is not a ledger: use sqlite, sqlite:///path, redis://host:port/db "
        "or postgresql://user@host/db"
    )


def check_prefect(value: Any) -> Any:
    """``embedded``, ``off`` (YAML 1.1 reads a bare ``off`` as false) or an http(s) API URL."""
    if value is False:
        return "off"
    if value is True:
        raise ValueError("true is not a Prefect mode: use embedded, off or an http(s) API URL")
    if value in ("embedded", "off") or not isinstance(value, str):
        return value  # a non-string fails the str type check with its own message
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc:
        return value.rstrip("/")
    raise ValueError(
        f"{value!r} is not a Prefect mode: use embedded, off or an http(s) API URL "
        "(like http://127.0.0.1:4200/api)"
    )


def check_ray_address(value: str | None) -> str | None:
    if value is None or value == "auto" or _HOST_PORT.match(value):
        return value
    if value.startswith("ray://") and urlsplit(value).netloc:
        return value
    raise ValueError(
        f"{value!r} is not a Ray address: use null (start a local Ray), auto, "
        "ray://host:port or host:port"
    )


# --- reading YAML ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not a silent win."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path, source: str) -> Any:
    """The parsed document of a config file; a :class:`ConfigError` if unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read the file: {exc}")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [("", f"{where}YAML syntax error: {problem}")]) from None
    if data is None:
        raise ConfigError(source, [("", "the file is empty; a config needs at least `flows:`")])
    return data


# --- flow entrypoints -----------------------------------------------------------------------


def entrypoint_problems(flows: Sequence[Any], base_dir: Path) -> list[tuple[str, str]]:
    """Import each flow's entrypoint; check its function can take the event parameter."""
    problems: list[tuple[str, str]] = []
    for i, flow in enumerate(flows):
        loc = key_path(("flows", i, "entrypoint"))
        try:
            obj = load_flow(flow.entrypoint, base_dir)
        except FlowLoadError as exc:
            problems.append((loc, str(exc)))
            continue
        problem = signature_problem(obj, flow.event_parameter)
        if problem:
            problems.append((loc, f"entrypoint {flow.entrypoint!r}: {problem}"))
    return problems


def signature_problem(flow_obj: Any, event_parameter: str) -> str | None:
    """Why the flow cannot be called with only ``event_parameter=event``; None if it can."""
    try:
        params = inspect.signature(getattr(flow_obj, "fn", flow_obj)).parameters
    except (TypeError, ValueError):
        return None  # not introspectable: let the run tell
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    param = params.get(event_parameter)
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if (param is None or param.kind not in named) and not has_kwargs:
        return (
            f"the flow has no parameter {event_parameter!r} to receive the event "
            f"(its parameters: {', '.join(params) or 'none'}); add "
            f"`{event_parameter}: dict | None = None` or set event_parameter"
        )
    required = [
        name
        for name, p in params.items()
        if name != event_parameter
        and p.default is inspect.Parameter.empty
        and p.kind in (*named, inspect.Parameter.POSITIONAL_ONLY)
    ]
    if required:
        return f"parameters without a default ({', '.join(required)}): only the event is passed"
    return None
