"""The cluster config file (SPEC section 2): validated models and the loader.

``load_config(path)`` reads YAML, validates it (unknown keys are errors) and, by default, imports
every flow entrypoint. Every problem becomes one line of a :class:`ConfigError` naming the file,
the key path (``flows[0].clocks[1].cron``) and what is wrong. Relative paths are relative to the
config file's folder (``ClusterConfig.base_dir``).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from actors.clocks import CLOCK_TYPES, ClockSpec, MissingDependency
from actors.clocks.base import GENERIC_KEYS
from actors.clocks.time import parse_duration
from actors.entrypoint import resolve_entrypoint
from actors.errors import FlowLoadError, ListenerError, UnknownFlowError
from actors.filters import EventFilter
from actors.worker import TRACKED_CONCURRENCY
from cluster.config_checks import (
    DEFAULT_TENANT,
    ConfigError,
    Loc,
    check_ledger,
    check_prefect,
    check_ray_address,
    duplicate_problems,
    entrypoint_problems,
    option_for_message,
    problems_error,
    quota_problems,
    read_yaml,
    translate,
)

__all__ = [
    "ClockConfig",
    "ClusterConfig",
    "ClusterSection",
    "ConfigError",
    "FlowConfig",
    "FlowRefError",
    "Ingress",
    "Quotas",
    "Tenant",
    "config_from_dict",
    "load_config",
]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Clock options that are filesystem paths, resolved against the config file's folder.
_PATH_OPTIONS: dict[str, frozenset[str]] = {"directory": frozenset({"path"})}


class FlowRefError(UnknownFlowError):
    """A ``tenant/flow`` or bare ``flow`` reference matches no flow, or several."""

    def __init__(self, message: str) -> None:
        ListenerError.__init__(self, message)
        self.reason, self.status = "unknown_flow", 404


def _slug(value: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return value


Slug = Annotated[str, AfterValidator(_slug)]
PosInt = Annotated[int, Field(ge=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Ingress(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)  # 0: pick a free port


class ClusterSection(_Model):
    state_dir: str = ".listeners"
    ledger: str = "sqlite"
    prefect: str = "embedded"
    workers: PosInt = 2
    worker_concurrency: PosInt = 16
    tracked_concurrency: PosInt = TRACKED_CONCURRENCY
    ray_address: str | None = None
    ingress: Ingress = Field(default_factory=Ingress)
    max_payload_bytes: PosInt = 1_048_576
    synchronous: Literal["normal", "full"] = "normal"
    coordinator_shards: PosInt = 1
    clocks_per_host: PosInt = 5000  # a host process is ~110 MB; a clock 5-50 KB
    heartbeat_seconds: float = Field(default=2.0, gt=0)

    _check_ledger = field_validator("ledger")(check_ledger)
    _check_prefect = field_validator("prefect", mode="before")(check_prefect)
    _check_ray_address = field_validator("ray_address")(check_ray_address)


class BatchDelivery(_Model):
    """``delivery: {mode: batch, ...}``: one run receives up to ``max_events`` events, after at
    most ``max_wait`` for the batch to fill (``delivery: batch`` takes the defaults)."""

    mode: Literal["batch"]
    max_events: PosInt = 100
    max_wait: float = 1.0

    @field_validator("max_wait", mode="before")
    @classmethod
    def _parse_max_wait(cls, value: Any) -> float:
        return parse_duration(value)


class Quotas(_Model):
    max_listeners: PosInt = 1000
    max_concurrent_runs: PosInt = 8
    max_events_per_second: PosInt = 1000
    # Events accepted but not yet started (workers saturated). Beyond it the tenant's sources
    # are read more slowly and its webhooks answer 429 with Retry-After; nothing is dropped.
    max_pending_runs: PosInt = 100_000


class Tenant(_Model):
    name: Slug
    token_env: str | None = None
    quotas: Quotas = Field(default_factory=Quotas)

    @field_validator("token_env")
    @classmethod
    def _check_token_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value


class ClockConfig(_Model):
    """One entry of a flow's ``clocks``: ``type``, optional ``name``, the rest are options."""

    type: str
    name: Slug | None = None  # filled in by FlowConfig: the type, then type-2, type-3, ...
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("options"), dict) and set(data) <= {"type", "name", "options"}:
            return data  # already split (a model_dump() of a ClockConfig)
        options = {k: v for k, v in data.items() if k not in ("type", "name")}
        return {**{k: data[k] for k in ("type", "name") if k in data}, "options": options}

    @model_validator(mode="after")
    def _check_against_clock(self, info: ValidationInfo) -> ClockConfig:
        try:
            cls = CLOCK_TYPES.get(self.type)
        except MissingDependency as exc:
            raise problems_error("clock", [(("type",), str(exc))]) from None
        if cls is None:
            known = ", ".join(sorted(CLOCK_TYPES))
            raise problems_error(
                "clock", [(("type",), f"unknown clock type {self.type!r}; known: {known}")]
            )
        unknown = [key for key in self.options if key not in cls.options | GENERIC_KEYS]
        if unknown:
            accepted = ", ".join(sorted(GENERIC_KEYS | cls.options))
            msg = f"unknown option for a {self.type} clock; accepted: {accepted}"
            raise problems_error("clock", [((key,), msg) for key in unknown])
        try:
            EventFilter.from_options(self.options)
            cls.check_options(self.resolved_options(_context_base_dir(info)))
        except (ValueError, TypeError) as exc:
            loc = option_for_message(self.options, str(exc))
            raise problems_error("clock", [(loc, str(exc))]) from None
        return self

    def resolved_options(self, base_dir: Path) -> dict[str, Any]:
        """The options with relative filesystem paths made absolute against ``base_dir``."""
        options = dict(self.options)
        for key in _PATH_OPTIONS.get(self.type, frozenset()):
            value = options.get(key)
            if isinstance(value, str) and value:
                options[key] = str((base_dir / Path(value).expanduser()).resolve())
        return options


def _context_base_dir(info: ValidationInfo) -> Path:
    context = info.context if isinstance(info.context, dict) else {}
    return Path(context.get("base_dir") or Path.cwd())


class FlowConfig(_Model):
    name: Slug
    tenant: Slug = DEFAULT_TENANT
    entrypoint: str
    event_parameter: str = "event"
    retries: int = Field(default=3, ge=0)
    retry_delay: float = 1.0  # seconds; the config may say "250ms", "2s", "5m", "1h"
    delivery: Literal["event"] | BatchDelivery = "event"  # "event": one flow run per event
    clocks: list[ClockConfig] = Field(default_factory=list)

    @field_validator("clocks", mode="before")
    @classmethod
    def _none_clocks(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("entrypoint")
    @classmethod
    def _check_entrypoint(cls, value: str) -> str:
        try:
            resolve_entrypoint(value)
        except FlowLoadError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("event_parameter")
    @classmethod
    def _check_event_parameter(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"{value!r} is not a Python parameter name")
        return value

    @field_validator("delivery", mode="before")
    @classmethod
    def _batch_shorthand(cls, value: Any) -> Any:
        return {"mode": "batch"} if value == "batch" else value

    @field_validator("retry_delay", mode="before")
    @classmethod
    def _parse_retry_delay(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _name_clocks(self) -> FlowConfig:
        taken: dict[str, int] = {}
        dupes: list[tuple[Loc, str]] = []
        for i, clock in enumerate(self.clocks):
            if clock.name is not None and taken.setdefault(clock.name, i) != i:
                msg = f"clock name {clock.name!r} is already used by clocks[{taken[clock.name]}]"
                dupes.append((("clocks", i, "name"), msg))
        if dupes:
            raise problems_error("flow", dupes)
        seen: Counter[str] = Counter()
        for clock in self.clocks:
            if clock.name is not None:
                continue
            seen[clock.type] += 1
            name = clock.type if seen[clock.type] == 1 else f"{clock.type}-{seen[clock.type]}"
            while name in taken:
                seen[clock.type] += 1
                name = f"{clock.type}-{seen[clock.type]}"
            clock.name = name
            taken[name] = -1
        return self

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.name}"


class ClusterConfig(_Model):
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    tenants: list[Tenant] = Field(default_factory=list)
    flows: list[FlowConfig] = Field(min_length=1)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<dict>")

    @field_validator("cluster", "tenants", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return {} if info.field_name == "cluster" else []
        return value

    @model_validator(mode="after")
    def _check_references(self, info: ValidationInfo) -> ClusterConfig:
        self._base_dir = _context_base_dir(info).resolve()
        context = info.context if isinstance(info.context, dict) else {}
        self._source = str(context.get("source", self._source))
        problems = duplicate_problems(self) + quota_problems(self)
        if problems:
            raise problems_error("config", problems)
        return self

    @property
    def base_dir(self) -> Path:
        """The config file's folder: relative paths in the config are relative to it."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the config came from (its file path, or ``<dict>``)."""
        return self._source

    @property
    def state_path(self) -> Path:
        return (self._base_dir / Path(self.cluster.state_dir).expanduser()).resolve()

    @property
    def ledger_url(self) -> str:
        """The ledger URL with SQLite paths made absolute (``sqlite`` → ``<state>/ledger.db``)."""
        ledger = self.cluster.ledger
        if ledger == "sqlite":
            return f"sqlite:///{self.state_path / 'ledger.db'}"
        if ledger.startswith("sqlite:///"):
            path = Path(ledger.removeprefix("sqlite:///")).expanduser()
            return f"sqlite:///{(self._base_dir / path).resolve()}"
        return ledger

    def all_tenants(self) -> list[Tenant]:
        """Declared tenants, plus the implicit ``default`` one if a flow uses it undeclared."""
        tenants = list(self.tenants)
        names = {t.name for t in tenants}
        if DEFAULT_TENANT not in names and any(f.tenant == DEFAULT_TENANT for f in self.flows):
            tenants.append(Tenant(name=DEFAULT_TENANT))
        return tenants

    def tenant(self, name: str) -> Tenant:
        for tenant in self.all_tenants():
            if tenant.name == name:
                return tenant
        raise FlowRefError(f"unknown tenant {name!r}")

    def token_for(self, tenant: str) -> str | None:
        """The tenant's ingress secret from its ``token_env`` variable; None if it has none."""
        env = next((t.token_env for t in self.tenants if t.name == tenant), None)
        return (os.environ.get(env) or None) if env else None

    def missing_tokens(self) -> list[str]:
        """``token_env`` variables that are declared but unset or empty."""
        return [
            t.token_env for t in self.tenants if t.token_env and not os.environ.get(t.token_env)
        ]

    def flow(self, tenant: str, name: str) -> FlowConfig:
        for flow in self.flows:
            if flow.tenant == tenant and flow.name == name:
                return flow
        raise UnknownFlowError(tenant, name)

    def find_flow(self, ref: str) -> FlowConfig:
        """A flow by ``tenant/flow`` or by a bare ``flow`` name that only one tenant uses."""
        tenant, _, name = ref.rpartition("/")
        found = [f for f in self.flows if f.name == name and (not tenant or f.tenant == tenant)]
        if len(found) == 1:
            return found[0]
        if found:
            refs = ", ".join(f.ref for f in found)
            raise FlowRefError(f"flow {ref!r} is ambiguous ({refs}): use tenant/flow")
        known = ", ".join(f.ref for f in self.flows)
        raise FlowRefError(f"unknown flow {ref!r}; known: {known}")

    def clock_specs(self) -> list[ClockSpec]:
        """Every clock of every flow, with relative paths resolved."""
        return [
            ClockSpec(
                tenant=flow.tenant,
                flow=flow.name,
                name=str(clock.name),
                type=clock.type,
                options=clock.resolved_options(self._base_dir),
            )
            for flow in self.flows
            for clock in flow.clocks
        ]


# --- loading -------------------------------------------------------------------------------


def config_from_dict(
    data: Any, base_dir: Path, source: str = "<dict>", *, check_entrypoints: bool = False
) -> ClusterConfig:
    """Validate an already-parsed config; raise :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"top level must be a mapping, not {_kind(data)}")])
    context = {"base_dir": Path(base_dir), "source": source}
    try:
        config = ClusterConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, translate(exc, ClusterConfig)) from None
    if check_entrypoints:
        problems = entrypoint_problems(config.flows, config.base_dir)
        if problems:
            raise ConfigError(source, problems)
    return config


def load_config(path: str | Path, check_entrypoints: bool = True) -> ClusterConfig:
    """Read, parse and validate a config file (and import its flows when ``check_entrypoints``)."""
    path = Path(path)
    data = read_yaml(path, str(path))
    return config_from_dict(
        data, path.resolve().parent, str(path), check_entrypoints=check_entrypoints
    )


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"a {type(value).__name__} ({value!r:.40})"
