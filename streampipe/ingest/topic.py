"""Topic templates: which foreign topics a source takes, and the names in them.

A template is an MQTT topic with named wildcards. ``{name}`` is one level (MQTT
``+``), ``{name:#}`` the rest of the topic (MQTT ``#``, last level only); plain ``+``
and ``#`` are allowed too and name nothing. The subscription filter is the template
with its names taken out, and a topic's names are read back by :meth:`TopicTemplate.match`.

>>> t = TopicTemplate("zigbee2mqtt/{device}", exclude=["zigbee2mqtt/bridge/#"])
>>> t.filter
'zigbee2mqtt/+'
>>> t.match("zigbee2mqtt/kitchen")
{'device': 'kitchen'}
>>> t.match("zigbee2mqtt/bridge/state") is None  # excluded
True
>>> TopicTemplate("tele/{rest:#}").match("tele/plug/SENSOR")
{'rest': 'plug/SENSOR'}
>>> fill("z2m.{device}", {"device": "kitchen"})
'z2m.kitchen'
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterable, Mapping

__all__ = ["TemplateError", "TopicTemplate", "fill", "names_in", "topic_matches"]

_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:#)?\}")
#: Topics whose match a template remembers (the most recently seen): a fleet publishes
#: on the same topics over and over, and a lookup costs a tenth of a match.
MATCH_CACHE = 10_000


class TemplateError(ValueError):
    """A topic template or device template that cannot be used (says what is wrong)."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter ``topic_filter`` (``+``, ``#``, and a
    leading ``$`` level that wildcards never match, as MQTT 3.1.1 §4.7.2 says).

    >>> topic_matches("zigbee2mqtt/bridge/#", "zigbee2mqtt/bridge")
    True
    >>> topic_matches("+/sensor/+/state", "$SYS/sensor/x/state")
    False
    """
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class TopicTemplate:
    """A topic template with optional exclusions (MQTT filters)."""

    def __init__(self, template: str, exclude: Iterable[str] = ()) -> None:
        if not isinstance(template, str) or not template:
            raise TemplateError("topic must be a non-empty string")
        self.template = template
        self.exclude = tuple(exclude)
        levels = template.split("/")
        # One entry per level: (literal, None), (None, name or "") for one level,
        # and the last may be (None, "#name") for the rest of the topic.
        self._levels: list[tuple[str | None, str | None]] = []
        self.names: list[str] = []
        filter_levels = []
        for i, level in enumerate(levels):
            last = i == len(levels) - 1
            m = _NAME.fullmatch(level)
            if m:
                name, rest = m.group(1), m.group(2)
                if name in self.names:
                    raise TemplateError(f"topic {template!r} names {{{name}}} twice")
                if rest and not last:
                    raise TemplateError(f"topic {template!r}: {{{name}:#}} must be the last level")
                self.names.append(name)
                self._levels.append((None, ("#" if rest else "") + name))
                filter_levels.append("#" if rest else "+")
            elif level in ("+", "#"):
                if level == "#" and not last:
                    raise TemplateError(f"topic {template!r}: '#' must be the last level")
                self._levels.append((None, level))
                filter_levels.append(level)
            else:
                if any(c in level for c in "{}+#"):
                    raise TemplateError(
                        f"topic {template!r}: level {level!r} mixes text and a wildcard; "
                        "a wildcard must be a whole level ({name}, {name:#}, + or #)"
                    )
                self._levels.append((level, None))
                filter_levels.append(level)
        self.filter = "/".join(filter_levels)
        self._matches = functools.lru_cache(maxsize=MATCH_CACHE)(self._match)
        for pattern in self.exclude:
            if not isinstance(pattern, str) or not pattern:
                raise TemplateError("exclude must be a list of MQTT topic filters")

    def excluded(self, topic: str) -> bool:
        return any(topic_matches(p, topic) for p in self.exclude)

    def match(self, topic: str) -> dict[str, str] | None:
        """The named levels of ``topic``, or ``None`` if it is not this template's
        (or is excluded). The same topic gives the same dict: do not change it."""
        return self._matches(topic)

    def _match(self, topic: str) -> dict[str, str] | None:
        if not topic_matches(self.filter, topic) or self.excluded(topic):
            return None
        t_levels = topic.split("/")
        values: dict[str, str] = {}
        for i, (_literal, wildcard) in enumerate(self._levels):
            if wildcard is None or wildcard in ("+", "#"):
                continue
            if wildcard.startswith("#"):
                values[wildcard[1:]] = "/".join(t_levels[i:])
            else:
                values[wildcard] = t_levels[i]
        return values

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r}, exclude={list(self.exclude)!r})"


def names_in(template: str) -> list[str]:
    """The ``{names}`` a device template uses; raises :class:`TemplateError` if it is
    not a valid template (``{0}``, ``{a.b}``, ``{a!r}`` and unbalanced braces are refused).

    >>> names_in("z2m.{device}")
    ['device']
    """
    if not isinstance(template, str) or not template:
        raise TemplateError("must be a non-empty string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"{template!r}: {e}") from None
    names = []
    for _text, name, spec, conv in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conv:
            raise TemplateError(f"{template!r}: {{{name}}} is not a plain {{name}}")
        names.append(name)
    return names


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with its ``{names}`` replaced by ``values``."""
    return template.format_map(values)
