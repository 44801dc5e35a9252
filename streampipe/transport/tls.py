"""How a client proves who it is and checks who the broker is: TLS files and a password.

:class:`TLSFiles` names the CA bundle that the broker's certificate must chain to, and
optionally a client certificate and key (for brokers with ``require_certificate true``).
:func:`with_credentials` is the one place where a password from a file or from the
environment, and the TLS files, are checked and joined to a :class:`BrokerURL`; every
command goes through it, so the rules are written once.

>>> url = with_credentials(BrokerURL.parse("mqtt://edge@localhost"), password="pw")
>>> url.username, url.password == "pw", url
('edge', True, BrokerURL('mqtt://edge:***@localhost:1883'))
>>> with_credentials(BrokerURL.parse("mqtt://localhost"), ca_file="ca.crt")
... # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streampipe.transport.tls.InvalidCredentials: --ca-file, ... need a TLS broker URL (mqtts://...)
"""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass
from pathlib import Path

from streampipe.transport.url import BrokerURL

__all__ = ["InvalidCredentials", "TLSFiles", "read_password_file", "with_credentials"]


class InvalidCredentials(ValueError):
    """Credentials or TLS files that cannot be used; ``str()`` says which and why."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for a TLS connection; ``ca_file=None`` trusts the system's CAs.

    >>> TLSFiles(key_file="client.key")
    Traceback (most recent call last):
    ...
    streampipe.transport.tls.InvalidCredentials: --key-file needs --cert-file
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if self.key_file and not self.cert_file:
            raise InvalidCredentials("--key-file needs --cert-file")

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker's certificate and host name."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidCredentials(f"cannot load CA file {self.ca_file}: {_why(exc)}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidCredentials(
                    f"cannot load client certificate {self.cert_file}"
                    + (f" with key {self.key_file}" if self.key_file else "")
                    + f": {_why(exc)}"
                ) from None
        return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else str(exc)


def read_password_file(path: str | Path) -> str:
    """The password in the first line of ``path`` (without its line ending).

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", delete=False) as f:
    ...     _ = f.write("s3cret\\n")
    >>> read_password_file(f.name)
    's3cret'
    >>> os.unlink(f.name)
    """
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as exc:
        raise InvalidCredentials(f"cannot read password file {path}: {_why(exc)}") from None
    except UnicodeDecodeError:
        raise InvalidCredentials(f"password file {path} is not UTF-8 text") from None
    password = line.rstrip("\r\n")
    if not password:
        raise InvalidCredentials(f"password file {path} is empty")
    return password


def with_credentials(
    url: BrokerURL,
    *,
    password: str | None = None,
    password_file: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> BrokerURL:
    """``url`` with its password and TLS files, after checking they make sense together.

    The password comes from exactly one of: the URL, ``password_file``, ``password``
    (e.g. ``$STREAMPIPE_PASSWORD``); in that order of precedence a file beats the
    environment, and a URL password together with a file is refused as ambiguous.
    """
    if password_file is not None and url.password is not None:
        raise InvalidCredentials("the broker URL has a password and --password-file gives another")
    secret = url.password
    if secret is None and password_file is not None:
        secret = read_password_file(password_file)
    if secret is None and password:
        secret = password
    if secret is not None and not url.username:
        raise InvalidCredentials("a password needs a user name: mqtt[s]://USER@host")
    files = TLSFiles(ca_file, cert_file, key_file)
    if not url.tls and files != TLSFiles():
        raise InvalidCredentials(
            "--ca-file, --cert-file and --key-file need a TLS broker URL (mqtts://...)"
        )
    url = dataclasses.replace(url, password=secret, tls_files=files if url.tls else None)
    if url.tls_files is not None:
        url.tls_files.context()  # bad files are a start-up error, not a reconnect loop
    return url
