"""Transport: broker URLs and MQTT v5 connections."""

from __future__ import annotations

from streampipe.transport.mqtt import ConnectError, Connection, Message, MQTTError, Will
from streampipe.transport.tls import (
    InvalidCredentials,
    TLSFiles,
    read_password_file,
    with_credentials,
)
from streampipe.transport.url import BrokerURL, InvalidBrokerURL

__all__ = [
    "BrokerURL",
    "ConnectError",
    "Connection",
    "InvalidBrokerURL",
    "InvalidCredentials",
    "MQTTError",
    "Message",
    "TLSFiles",
    "Will",
    "read_password_file",
    "with_credentials",
]
