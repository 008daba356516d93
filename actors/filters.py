"""Per-clock event filters: a JMESPath expression over the event, so users drop events
without writing code (``filter: "payload.size > `0` && starts_with(payload.key, 'in/')"``).

An event passes when the expression's result is truthy. Filtered events are acknowledged at
the source (they were seen and deliberately dropped) and counted per clock in ``status``.
"""

from __future__ import annotations

from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

FILTER_OPTION = "filter"


class EventFilter:
    def __init__(self, expression: str) -> None:
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError("option 'filter' must be a non-empty JMESPath expression")
        try:
            self._compiled = jmespath.compile(expression)
        except JMESPathError as exc:
            raise ValueError(f"option 'filter' is not valid JMESPath: {exc}") from None
        self.expression = expression

    def matches(self, event: dict[str, Any]) -> bool:
        try:
            return bool(self._compiled.search(event))
        except JMESPathError:  # a type error inside the expression for this event: no match
            return False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EventFilter | None:
        expr = options.get(FILTER_OPTION)
        return None if expr is None else cls(expr)
