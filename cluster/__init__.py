"""The control plane of listener-cluster: config, bootstrap onto Ray, ``listen()``, the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actors.event import Event

if TYPE_CHECKING:
    from cluster.api import listen

__all__ = ["Event", "listen"]


def __getattr__(name: str) -> Any:
    # ``listen`` pulls in Ray; import it only when asked for.
    if name == "listen":
        from cluster.api import listen

        return listen
    raise AttributeError(name)
