"""Helpers shared by the safetensors tests (test_weights.py, test_checkpoint.py)."""

import json


def same_bytes(a, b):
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def write_raw(path, header, data=b""):
    """A hand-made file: header is a JSON-able object, or raw bytes used as the header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg
