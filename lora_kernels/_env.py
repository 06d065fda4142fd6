"""os.environ.get for settings read on every call (the knobs that force a backend or a kernel choice).

os.environ.get encodes the name and, for an unset variable, raises and catches a KeyError inside the mapping
layer: ~1 µs per read alone, more inside a deep call (bench/results/host-overhead-cpu-20261207-env-params.txt).
get() reads the dict behind os.environ where CPython keeps one, so it sees every change made through
os.environ (assignment, monkeypatch, del) and returns the same str or None."""
import os

_data = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
_decode = getattr(os.environ, "decodevalue", None)
_direct = isinstance(_data, dict) and callable(_encode) and callable(_decode)
_keys: dict = {}


def get(name: str):
    """os.environ.get(name)."""
    if not _direct:
        return os.environ.get(name)
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _encode(name)
    value = _data.get(key)
    return None if value is None else _decode(value)


def interpreting() -> bool:
    """Whether Triton's kernels run under its CPU interpreter (TRITON_INTERPRET=1); asked on every launch."""
    return get("TRITON_INTERPRET") == "1"
