"""Broker addresses: ``mqtt://[user:pass@]host[:port]`` and ``mqtts://`` for TLS.

>>> u = BrokerURL.parse("mqtt://alice:s3cret@localhost:1884")
>>> u.host, u.port, u.username, u.tls
('localhost', 1884, 'alice', False)
>>> u
BrokerURL('mqtt://alice:***@localhost:1884')
>>> BrokerURL.parse("mqtts://broker.example").port
8883
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from streampipe.transport.tls import TLSFiles

__all__ = ["BrokerURL", "InvalidBrokerURL"]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class InvalidBrokerURL(ValueError):
    """A ``--broker`` value that is not an MQTT URL."""


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """Where a broker is and how to log in; the password never appears in its repr.

    ``tls_files`` (CA, client certificate and key) are set by
    :func:`~streampipe.transport.tls.with_credentials`; ``None`` with ``tls`` trusts the
    system's CAs.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_files: TLSFiles | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> BrokerURL:
        if "://" not in text:
            text = "mqtt://" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise InvalidBrokerURL(f"broker URL is not valid: {exc}") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise InvalidBrokerURL(
                f"broker URL scheme must be mqtt:// or mqtts://, not {parts.scheme}://"
            )
        if not parts.hostname:
            raise InvalidBrokerURL("broker URL has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidBrokerURL("broker URL must be scheme://[user:pass@]host[:port] only")
        return cls(
            host=parts.hostname,
            port=port or DEFAULT_PORTS[parts.scheme],
            tls=parts.scheme == "mqtts",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username:
            auth = self.username + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"BrokerURL({str(self)!r})"
