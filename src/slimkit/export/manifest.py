"""The artifact's ``slimkit.json``: its schema, its digest file, its optional Ed25519 signature, and safe names.

``slimkit.json.sha256`` holds the SHA-256 of the exact bytes of ``slimkit.json`` (``sha256sum -c`` reads it), so
an edited manifest is refused; it proves the manifest was not changed by accident, not who wrote it. A signature
(``slimkit.json.sig``, Ed25519 over the same bytes, with the ``cryptography`` package: ``pip install
slimkit[sign]``) says who wrote it. Every field is validated against ``Manifest`` (pydantic, unknown fields
refused) before anything reads it.

Example:
    >>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey   # doctest: +SKIP
    >>> key = Ed25519PrivateKey.generate()                                               # doctest: +SKIP
    >>> slimkit.save(result, "out/m.slim", signing_key=key)                              # doctest: +SKIP
    >>> slimkit.load("out/m.slim", public_key=key.public_key())                          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError

from slimkit.errors import DependencyError, InputTypeError, UsageError

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "slimkit.json"
DIGEST = "slimkit.json.sha256"
SIGNATURE = "slimkit.json.sig"
RESERVED = (MANIFEST, DIGEST, SIGNATURE)

__all__ = [
    "DIGEST",
    "MANIFEST",
    "SIGNATURE",
    "ArtifactError",
    "Manifest",
    "digest_line",
    "read_small",
    "safe_name",
    "sign",
    "validate",
    "verify",
]


class ArtifactError(UsageError):
    """An artifact folder that cannot be written or trusted; the message names the file."""


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=100)]
FactorySpec = Annotated[
    str,
    StringConstraints(
        pattern=r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:)?[A-Za-z_][A-Za-z0-9_.\-]*$", max_length=300
    ),
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Dim = Annotated[int, Field(ge=0, le=2**31)]


class Source(BaseModel):
    """How to build the architecture: a zoo name or ``module:function``, and its keyword arguments."""

    model_config = _STRICT
    factory: FactorySpec
    kwargs: dict[Identifier, JsonValue] = {}


class Step(BaseModel):
    """One entry of the history: the verb's kind and its JSON record."""

    model_config = _STRICT
    kind: Identifier
    record: dict[str, JsonValue]


class PackedLayer(BaseModel):
    """How one quantized weight is stored as packed integer codes (see ``quantization.pack``)."""

    model_config = _STRICT
    width: Literal[1, 2, 4, 8]
    offset: Annotated[int, Field(ge=-(2**8), le=2**8)]
    step: Literal[1, 2]
    codes_shape: Annotated[list[Dim], Field(min_length=1, max_length=8)]
    weight_shape: Annotated[list[Dim], Field(min_length=1, max_length=8)]
    scheme: Identifier
    bits: Annotated[int, Field(ge=1, le=8)]


class Packing(BaseModel):
    """Packed layers by module name and the all-zero zero-point buffers dropped from the file (with shapes)."""

    model_config = _STRICT
    version: int
    layers: dict[str, PackedLayer]
    zeros: dict[str, Annotated[list[Dim], Field(max_length=8)]]


class Manifest(BaseModel):
    """The schema of ``slimkit.json``."""

    model_config = _STRICT
    format: Literal["slimkit-artifact"]
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    slimkit_version: Annotated[str, StringConstraints(max_length=100)]
    torch_version: Annotated[str, StringConstraints(max_length=100)]
    source: Source
    history: list[Step]
    packing: Packing | None
    metrics: dict[str, JsonValue]
    files: dict[str, Sha256]


def validate(data: Any, origin: str = MANIFEST) -> dict[str, Any]:
    """Check parsed ``slimkit.json`` against ``Manifest``; returns it as plain JSON, or raises naming the field.

    Example:
        >>> validate({"format": "slimkit-artifact"})
        Traceback (most recent call last):
        ...
        slimkit.export.manifest.ArtifactError: slimkit.json: field 'format_version': Field required; ...
    """
    if not isinstance(data, dict):
        raise ArtifactError(f"{origin}: the manifest must be a JSON object, not {type(data).__name__}")
    version = data.get("format_version")
    if data.get("format") == FORMAT and type(version) is int and version > FORMAT_VERSION:
        raise ArtifactError(
            f"{origin}: format version {version} is newer than this slimkit reads ({FORMAT_VERSION}); upgrade slimkit"
        )
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise ArtifactError(
            f"{origin}: field {field!r}: {error['msg']}; the manifest is malformed, "
            "re-export the artifact from its source"
        ) from None
    for name in data["files"]:
        safe_name(name, f"{origin}: files")
    return data


def safe_name(name: Any, where: str) -> str:
    """``name`` as a normalised relative POSIX path inside the folder; refuses absolute, ``..`` and reserved names.

    Example:
        >>> safe_name("plots/./a.png", "files")
        'plots/a.png'
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or re.match(r"^[A-Za-z]:", name):
        raise ArtifactError(f"{where}: file name {name!r} is not a plain relative path")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArtifactError(
            f"{where}: file name {name!r} leaves the artifact folder (absolute or '..'); "
            "use a name relative to the folder"
        )
    normal = str(PurePosixPath(*[part for part in path.parts if part != "."])) if path.parts else ""
    if normal in ("", ".") or normal in RESERVED:
        raise ArtifactError(f"{where}: file name {name!r} is empty or reserved ({', '.join(RESERVED)})")
    return normal


def digest_line(data: bytes) -> str:
    """The content of ``slimkit.json.sha256`` for manifest bytes ``data`` (``sha256sum`` format)."""
    return f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n"


def read_small(path: Path, limit: int = 1 << 26) -> bytes | None:
    """The bytes of a regular file inside an artifact (None if absent); a symlink or a huge file is refused."""
    if path.is_symlink():
        raise ArtifactError(
            f"{path} is a symbolic link; an artifact holds only regular files (links are never "
            "followed). Replace it with the file itself."
        )
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > limit:
        raise ArtifactError(f"{path} is not a regular file of at most {limit >> 20} MiB")
    return path.read_bytes()


def verify(folder: Path, data: bytes, public_key: Any = None) -> None:
    """Check manifest bytes ``data`` against ``folder``'s digest file and, given ``public_key``, its signature."""
    digest = read_small(folder / DIGEST, 1 << 12)
    if digest is None:
        raise ArtifactError(
            f"{folder / DIGEST} is missing, so {MANIFEST} is not covered by a digest; re-save the "
            "artifact with this slimkit"
        )
    if digest.split()[:1] != [hashlib.sha256(data).hexdigest().encode()]:
        raise ArtifactError(
            f"{folder / MANIFEST} was modified after the artifact was written (its SHA-256 does not "
            f"match {DIGEST}); refusing it. Re-export the artifact from its source."
        )
    if public_key is None:
        return
    key = _public_key(public_key)
    signature = read_small(folder / SIGNATURE, 1 << 12)
    if signature is None:
        raise ArtifactError(
            f"{folder / SIGNATURE} is missing but a public key was given: the artifact is not signed; "
            "ask its author to save it with slimkit.save(..., signing_key=...)"
        )
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), data)
    except (InvalidSignature, ValueError) as exc:
        raise ArtifactError(
            f"{folder / SIGNATURE} does not verify with the given public key: the manifest was not "
            "signed by that key's owner or was changed since; do not load it"
        ) from exc


def sign(data: bytes, signing_key: Any) -> str:
    """The content of ``slimkit.json.sig``: base64 Ed25519 signature of ``data``."""
    return base64.b64encode(_private_key(signing_key).sign(data)).decode() + "\n"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise DependencyError("signing artifacts needs the cryptography package: pip install 'slimkit[sign]'") from exc
    return serialization, ed25519


def _key_bytes(key: Any) -> bytes:
    if isinstance(key, (str, os.PathLike)):
        return Path(key).read_bytes()
    return bytes(key)


def _private_key(key: Any):
    """An Ed25519 private key from a key object, PEM bytes, 32 raw bytes or a PEM file path."""
    return _ed25519_key(key, private=True)


def _public_key(key: Any):
    """An Ed25519 public key from a key object, PEM bytes, 32 raw bytes or a PEM file path."""
    return _ed25519_key(key, private=False)


def _ed25519_key(key: Any, *, private: bool):
    serialization, ed25519 = _crypto()
    cls = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    field, kind = ("signing_key", "private") if private else ("public_key", "public")
    if isinstance(key, cls):
        return key
    if not isinstance(key, (str, os.PathLike, bytes)):
        raise InputTypeError(f"{field}: expected an {cls.__name__}, PEM bytes or a PEM file, got {type(key).__name__}")
    raw = _key_bytes(key)
    try:
        if len(raw) == 32:
            loaded = cls.from_private_bytes(raw) if private else cls.from_public_bytes(raw)
        elif private:
            loaded = serialization.load_pem_private_key(raw, password=None)
        else:
            loaded = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        unencrypted = "unencrypted " if private else ""
        raise UsageError(f"{field}: not an {unencrypted}Ed25519 {kind} key ({exc})") from exc
    if not isinstance(loaded, cls):
        raise UsageError(f"{field}: a {type(loaded).__name__}, not an Ed25519 {kind} key")
    return loaded
