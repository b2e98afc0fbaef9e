"""The `model` field of a multipart/form-data body (the audio routes), found by a bounded
scan instead of a full parse.

The standard library's email parser builds every part and walks the body line by line
in Python: an 8 MiB body of CRLFs held the event loop for seconds. The router needs one
small field, so it looks only at part headers: the next boundary is found by
`bytes.find` (C, memchr speed), each part's headers must end within
`_MAX_PART_HEADER_BYTES`, the `model` value within `_MAX_MODEL_BYTES`, and at most
`_MAX_PARTS` parts are looked at (the form's other parts, audio included, are skipped
by one `find` each). The body itself is forwarded unchanged.
"""

from __future__ import annotations

import re

_MAX_PARTS = 256
_MAX_PART_HEADER_BYTES = 16384
_MAX_MODEL_BYTES = 1024
# RFC 2046's boundary characters (quoted, a space may occur but not end it).
_BOUNDARY = re.compile(
    r";\s*boundary=(?:\"([0-9A-Za-z'()+_,\-./:=? ]{1,70})\"|([0-9A-Za-z'()+_\-./:=?]{1,70}))"
    r"\s*(?:;|$)",
    re.IGNORECASE,
)
_MODEL_DISPOSITION = re.compile(
    rb'^content-disposition:[^\r\n]*;[ \t]*name=(?:"model"|model)[ \t]*(?:;|\r|$)',
    re.IGNORECASE | re.MULTILINE,
)


class MalformedMultipart(ValueError):
    """The body is not the multipart form its Content-Type says."""


def multipart_boundary(content_type: str) -> bytes:
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise MalformedMultipart("multipart Content-Type without a valid boundary")
    return (match.group(1) or match.group(2)).encode("ascii")


def multipart_model(content_type: str, body: bytes) -> str | None:
    """The value of the form's `model` field, or None when the form has none (among its
    first `_MAX_PARTS` parts). Raises MalformedMultipart."""
    delimiter = b"--" + multipart_boundary(content_type)
    # The first delimiter starts the body or follows a preamble's CRLF.
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise MalformedMultipart("no multipart boundary in the body")
        pos = start + 2 + len(delimiter)
    next_delimiter = b"\r\n" + delimiter
    for _ in range(_MAX_PARTS):
        if body.startswith(b"--", pos):  # the closing delimiter
            return None
        line_end = body.find(b"\r\n", pos, pos + 1024)  # transport padding, then CRLF
        if line_end < 0:
            raise MalformedMultipart("malformed multipart boundary line")
        headers_start = line_end + 2
        # From line_end, so that a part without headers (CRLF CRLF at once) is found too.
        headers_end = body.find(b"\r\n\r\n", line_end, headers_start + _MAX_PART_HEADER_BYTES)
        if headers_end < 0:
            raise MalformedMultipart("multipart part headers too long or unterminated")
        content_start = headers_end + 4
        headers = body[headers_start : headers_end + 2]
        if _MODEL_DISPOSITION.search(headers):
            end = body.find(next_delimiter, content_start, content_start + _MAX_MODEL_BYTES + 2)
            if end < 0:
                raise MalformedMultipart("multipart `model` field too long or unterminated")
            return body[content_start:end].decode("utf-8", "replace").strip()
        end = body.find(next_delimiter, content_start)
        if end < 0:
            raise MalformedMultipart("multipart part without a closing boundary")
        pos = end + len(next_delimiter)
    return None
