"""Secrets for encrypted images: QEMU's ``--object secret,...`` objects.

``--object secret,id=ID,data=TEXT[,format=raw|base64]`` or
``--object secret,id=ID,file=PATH[,format=raw|base64]`` registers a secret
under ``ID`` (:func:`add_secret` with the parsed properties, or
:func:`add_secret_object` with the option's text); an image opened with
``key-secret=ID`` (``encrypt.key-secret=ID`` for qcow2) asks
:func:`secret` for its bytes. The registry lives for the process (one
command, or one daemon), as QEMU's object tree does. QEMU's texts for the
errors a user makes.
"""
from __future__ import annotations

import os

from ..errors import UsageError

_SECRETS: dict[str, bytes] = {}
#: image (real path) -> the id of the secret that unlocks it
_KEYS: dict[str, str] = {}


def add_secret(props: dict[str, str]) -> None:
    """Register one secret from its properties (``id``, ``data`` or
    ``file``, ``format``). Encrypted secrets (``keyid``/``iv``) are not
    supported."""
    sid = props.get("id")
    if not sid:
        raise UsageError("Parameter 'id' is missing")
    if sid in _SECRETS:
        raise UsageError(f"attempt to add duplicate property '{sid}' to object (type 'container')")
    unknown = set(props) - {"id", "data", "file", "format", "qom-type"}
    if {"keyid", "iv"} & unknown:
        raise UsageError("encrypted secrets (keyid, iv) are not supported by blkjobs")
    if unknown:
        raise UsageError(f"Property 'secret.{sorted(unknown)[0]}' not found")
    fmt = props.get("format", "raw")
    if fmt not in ("raw", "base64"):
        raise UsageError(f"Parameter 'format' does not accept value '{fmt}'")
    if "data" in props and "file" in props:
        raise UsageError("'data' and 'file' are mutually exclusive")
    if "data" in props:
        value = props["data"].encode()
    elif "file" in props:
        try:
            with open(props["file"], "rb") as f:
                value = f.read()
        except OSError as e:
            raise UsageError(f"Unable to read {props['file']}: {e.strerror}") from None
    else:
        raise UsageError("Either 'file' or 'data' must be provided")
    if fmt == "base64":
        import base64       # here: every qcow2 open imports this module (start-up)
        import binascii
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("Unable to decode base64 data") from None
    _SECRETS[sid] = value


def add_secret_object(text: str) -> None:
    """Register ``secret,id=ID,data=...`` (the ``--object`` option's text,
    with or without the leading ``secret``/``qom-type=secret``). A doubled
    comma stands for a comma inside a value, as in QEMU's option syntax."""
    items: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == "," and text[i + 1:i + 2] == ",":
            cur += ","
            i += 2
            continue
        if c == ",":
            items.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    items.append(cur)
    props: dict[str, str] = {}
    for n, item in enumerate(items):
        if n == 0 and "=" not in item:
            props["qom-type"] = item
            continue
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(f"Invalid parameter '{k}'")
        props[k] = v
    if props.pop("qom-type", "secret") != "secret":
        raise UsageError(f"'{text}': only secret objects are supported")
    add_secret(props)


def secret(sid: str) -> bytes:
    """The bytes of secret ``sid`` (QEMU's text when there is none)."""
    try:
        return _SECRETS[sid]
    except KeyError:
        raise UsageError(f"No secret with id '{sid}'") from None


def bind_key(path: str, sid: str | None) -> None:
    """Open the encrypted image ``path`` with secret ``sid`` from now on
    when no key is named at the open (what ``--image-opts
    driver=luks,key-secret=ID,file.filename=PATH`` or
    ``encrypt.key-secret=ID`` says; an image created with a key is bound to
    it). ``sid`` None: unbind."""
    real = os.path.realpath(path)
    if sid is None:
        _KEYS.pop(real, None)
    else:
        _KEYS[real] = sid


def bound_key(path: str) -> str | None:
    """The secret id bound to ``path`` (:func:`bind_key`), or None."""
    return _KEYS.get(os.path.realpath(path)) if _KEYS else None


def remove_secret(sid: str) -> None:
    """Forget secret ``sid`` (QMP ``object-del``; tests)."""
    _SECRETS.pop(sid, None)
