"""``listen()``: PIN 14's ``FlowRunner.listen()`` for a flow defined in a plain script."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import Any

from cluster.clocks import Clock
from cluster.config import config_from_dict
from cluster.runtime import LocalCluster


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return slug[:63] or "flow"


def listen(
    flow: Any,
    clocks: list[Clock] | None = None,
    event_parameter: str = "event",
    *,
    name: str | None = None,
    tenant: str = "default",
    retries: int = 3,
    retry_delay: str | float = "1s",
    state_dir: str | Path = ".listeners",
    prefect: str = "embedded",
    workers: int = 2,
    ray_address: str | None = None,
    ingress_port: int = 8787,
    block: bool = True,
    stop_event: threading.Event | None = None,
) -> LocalCluster | None:
    """Start (or join) Ray, run the clocks, and run ``flow`` once per new event or tick.

    Blocks until interrupted (Ctrl-C, SIGTERM or ``stop_event``), then stops cleanly. With
    ``block=False`` it returns the running :class:`LocalCluster` instead; call ``stop()``.
    """
    flow_name = name or _slug(getattr(flow, "name", None) or flow.__name__)
    data = {
        "cluster": {
            "state_dir": str(state_dir),
            "prefect": prefect,
            "workers": workers,
            "ray_address": ray_address,
            "ingress": {"port": ingress_port},
        },
        "flows": [
            {
                "name": flow_name,
                "tenant": tenant,
                "entrypoint": f"{flow.__module__}:{flow_name}",
                "event_parameter": event_parameter,
                "retries": retries,
                "retry_delay": retry_delay,
                "clocks": [c.to_config() for c in clocks or []],
            }
        ],
    }
    config = config_from_dict(data, Path.cwd(), source="listen()")
    from actors.flow_runner import check_event_parameter

    check_event_parameter(flow, event_parameter)
    cluster = LocalCluster(config, flow_objs={f"{tenant}/{flow_name}": flow}).start()
    if not block:
        return cluster
    stop = stop_event or threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        cluster.stop()
    return None
