"""Load a flow from an entrypoint: ``path/to/file.py:function`` or ``package.module:function``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

from actors.errors import FlowLoadError


def resolve_entrypoint(entrypoint: str, base_dir: Path | None = None) -> str:
    """Make a path entrypoint absolute against ``base_dir`` (the config file's folder)."""
    target, sep, func = entrypoint.rpartition(":")
    if not sep or not target or not func:
        raise FlowLoadError(
            f"entrypoint {entrypoint!r} must look like 'path/to/file.py:function' "
            "or 'package.module:function'"
        )
    if target.endswith(".py") and base_dir is not None and not Path(target).is_absolute():
        target = str((base_dir / target).resolve())
    return f"{target}:{func}"


def load_flow(entrypoint: str, base_dir: Path | None = None) -> Any:
    """Import the entrypoint and return the object it names, which must be a Prefect flow."""
    from prefect import Flow

    target, _, func = resolve_entrypoint(entrypoint, base_dir).rpartition(":")
    module = _import_target(target, entrypoint)
    try:
        obj = getattr(module, func)
    except AttributeError:
        raise FlowLoadError(
            f"entrypoint {entrypoint!r}: {target} has no attribute {func!r}"
        ) from None
    if not isinstance(obj, Flow):
        raise FlowLoadError(
            f"entrypoint {entrypoint!r} is a {type(obj).__name__}, not a Prefect @flow"
        )
    return obj


def _import_target(target: str, entrypoint: str) -> Any:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FlowLoadError(f"entrypoint {entrypoint!r}: file {path} does not exist")
        name = "listener_flow_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise FlowLoadError(f"entrypoint {entrypoint!r}: cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[name]
            raise _import_error(entrypoint, exc) from None
        return module
    try:
        return importlib.import_module(target)
    except BaseException as exc:
        raise _import_error(entrypoint, exc) from None


def _import_error(entrypoint: str, exc: BaseException) -> FlowLoadError:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return FlowLoadError(f"entrypoint {entrypoint!r} does not import: {last}")
