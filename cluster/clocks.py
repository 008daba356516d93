"""Clock declarations for the Python API (``listen(flow, clocks=[...])``).

Each is the Python spelling of one config ``clocks:`` entry; options are validated by the
same rules as the config file.
"""

from __future__ import annotations

from typing import Any


class Clock:
    """A clock declaration: ``type`` plus options, turned into a config entry."""

    type: str = ""

    def __init__(self, *, name: str | None = None, **options: Any) -> None:
        self.name = name
        self.options = {k: v for k, v in options.items() if v is not None}

    def to_config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.type, **self.options}
        if self.name:
            entry["name"] = self.name
        return entry

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class IntervalClock(Clock):
    """A tick every ``every`` (``"60s"``, ``"5m"``, or seconds), aligned so ids are stable."""

    type = "interval"

    def __init__(self, every: str | float, **options: Any) -> None:
        super().__init__(every=every, **options)


class CronClock(Clock):
    """A tick at each time of a 5-field cron expression, in ``timezone`` (default UTC)."""

    type = "cron"

    def __init__(self, cron: str, timezone: str | None = None, **options: Any) -> None:
        super().__init__(cron=cron, timezone=timezone, **options)


class RRuleClock(Clock):
    """A tick at each occurrence of an RFC 5545 RRULE, in ``timezone`` (default UTC)."""

    type = "rrule"

    def __init__(self, rrule: str, timezone: str | None = None, **options: Any) -> None:
        super().__init__(rrule=rrule, timezone=timezone, **options)


class DirectoryClock(Clock):
    """An event per file landing in ``path`` (matching ``pattern``)."""

    type = "directory"

    def __init__(self, path: str, pattern: str | None = None, **options: Any) -> None:
        super().__init__(path=str(path), pattern=pattern, **options)


class S3Clock(Clock):
    """An event per object created under ``s3://bucket/prefix``."""

    type = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str | None = None,
        endpoint_url: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url, **options)


class WebhookClock(Clock):
    """Events POSTed to the cluster's ingress at ``/v1/events/{tenant}/{flow}``."""

    type = "webhook"


__all__ = [
    "Clock",
    "CronClock",
    "DirectoryClock",
    "IntervalClock",
    "RRuleClock",
    "S3Clock",
    "WebhookClock",
]
