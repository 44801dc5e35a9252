"""The codec's one error type and the limits that bound decoding untrusted bytes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "REASONS", "CodecError", "Limits"]

#: Every ``CodecError.reason``; a bounded set, safe as a Prometheus label value.
REASONS: frozenset[str] = frozenset(
    {
        "too_large",  # the frame is longer than Limits.max_frame_bytes
        "bad_magic",  # not a streampipe frame at all
        "unsupported_version",  # a streampipe frame of a format version we cannot read
        "decompression_failed",  # the zstd payload is corrupt
        "decompressed_too_large",  # the payload inflates past Limits.max_decompressed_bytes
        "malformed",  # truncated, inconsistent or trailing bytes
        "unknown_schema",  # the frame names its fields by a schema id we have not seen
        "too_many_readings",  # more than Limits.max_readings
        "too_many_fields",  # more than Limits.max_fields
        "too_many_values",  # readings x fields over Limits.max_values
        "string_too_long",  # a device id or field name over Limits.max_string_bytes
        "bad_field_names",  # a field name is empty or named twice: no model could take it
    }
)


class CodecError(ValueError):
    """Bytes that are not a frame we can decode, or a batch we cannot encode.

    ``reason`` is a short machine label from :data:`REASONS`; ``str(err)`` is a
    sentence for humans.

    >>> err = CodecError("bad_magic", "not a streampipe frame")
    >>> err.reason, str(err)
    ('bad_magic', 'not a streampipe frame')
    """

    def __init__(self, reason: str, message: str, schema_id: str | None = None) -> None:
        if reason not in REASONS:
            raise AssertionError(f"unknown codec error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.schema_id = schema_id  # for "unknown_schema": the id the frame refers to

    def __reduce__(self) -> tuple[type[CodecError], tuple[str, str]]:
        return CodecError, (self.reason, str(self))  # picklable across processes


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what :func:`~streampipe.codec.decode` accepts, so a hostile frame
    costs at most a few tens of MiB and milliseconds.

    >>> Limits(max_readings=10).max_readings
    10
    """

    # A batch of 100k readings of 6 fields encodes to well under 1 MiB; 4 MiB leaves
    # room for noisy raw-float data while staying far below broker packet limits.
    max_frame_bytes: int = 4 << 20
    # Checked against the size the frame declares before inflating, and enforced
    # while inflating: a zstd bomb is cut off at this many bytes.
    max_decompressed_bytes: int = 64 << 20
    # Larger batches add latency without saving bytes; 100k is ~3 hours at 10 Hz.
    max_readings: int = 100_000
    # Far more features than any sensor sends; bounds the per-field Python work.
    max_fields: int = 1024
    # readings x fields: the decoded values array is at most 32 MiB of float64,
    # even when every column compresses to nothing.
    max_values: int = 1 << 22
    # Device ids and field names are short identifiers, not payloads.
    max_string_bytes: int = 128

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int")


DEFAULT_LIMITS = Limits()
