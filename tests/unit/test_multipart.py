"""The multipart `model` scan: finds the field wherever it is among the parts, looks no
further than part headers, and refuses malformed forms."""

from __future__ import annotations

import pytest

from deepinfer_router.proxy.multipart import MalformedMultipart, multipart_model

CT = "multipart/form-data; boundary=XyZ"


def form(*parts: tuple[str, bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for headers, content in parts:
        out += b"--XyZ\r\n" + headers.encode() + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--XyZ--\r\n"


def test_model_field_found_after_a_file_part() -> None:
    body = form(
        ('Content-Disposition: form-data; name="file"; filename="model"\r\n'
         "Content-Type: audio/wav", b"RIFF\r\n--Xy not a boundary" + b"\x00" * 1000),
        ('Content-Disposition: form-data; name="model"', b" whisper-1 "),
    )
    assert multipart_model(CT, body) == "whisper-1"
    assert multipart_model('multipart/form-data; boundary="XyZ"', body) == "whisper-1"
    assert multipart_model(CT, form(("content-disposition: form-data; name=model", b"m"),
                                    preamble=b"preamble\r\n")) == "m"


def test_no_model_field() -> None:
    assert multipart_model(CT, form(('Content-Disposition: form-data; name="file"', b"x"))) is None
    assert multipart_model(CT, b"--XyZ--\r\n") is None


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--XyZ--"),  # no boundary parameter
        ("multipart/form-data; boundary=\udcff\udcfe", b"--x--"),  # not a boundary
        (CT, b"\r\n" * 100_000),  # no delimiter at all
        (CT, b"--XyZ\r\n" + b"X-Header: y\r\n" * 5_000),  # part headers never end
        (CT, b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + b"m" * 5000),
        (CT, b'--XyZ\r\nContent-Disposition: form-data; name="f"\r\n\r\n' + b"\r\n" * 1000),
    ],
)
def test_malformed(content_type: str, body: bytes) -> None:
    with pytest.raises(MalformedMultipart):
        multipart_model(content_type, body)
