"""Protected checkpoints: an Ed25519-signed manifest and AES-256-GCM encryption of the tensor data at rest.

A checkpoint written by :func:`fastquant.save` is protected in place by :func:`protect_file`:

- **Signature.** The manifest (the exact JSON string stored in the safetensors header) is signed with an Ed25519
  private key; the signature and the signer's public key go in two more header entries. The manifest holds every
  tensor's sha256, dtype and shape and the ``aliases``, so a valid signature over it vouches for every byte
  loaded: an edited alias, tensors swapped together with their manifest entries, or a changed layer size all
  break it. ``fastquant.load(..., trusted_keys=[...])`` refuses a file that is unsigned or signed by another key.
- **Encryption.** Each tensor's bytes are encrypted with AES-256-GCM under a fresh 96-bit nonce; the tensor's
  name, dtype and shape are the associated data, so a ciphertext moved to another name fails its tag. The
  stored tensor is the ciphertext (uint8, tag appended); the manifest keeps the plaintext dtype and shape, the
  nonce, and the sha256 of the ciphertext (so hashes can be checked without the key). The manifest records a
  key id (a hash of the key, which says nothing about the key) so that a wrong key is refused before anything
  is decrypted or allocated. Encrypted files use checkpoint format version 2: older fastquant versions refuse
  them with "upgrade fastquant" instead of misreading them.

The 32-byte encryption key comes from ``FASTQUANT_KEY`` (64 hex characters), a key file named by
``FASTQUANT_KEY_FILE`` or passed directly; it is never logged or written into an error message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

try:
    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import serialization as crypto_serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _CRYPTO_ERROR: ImportError | None = None
except ImportError as exc:  # plain checkpoints load without it; protected ones say what to install
    _CRYPTO_ERROR = exc


def _need_crypto(what: str) -> None:
    if _CRYPTO_ERROR is not None:
        raise ProtectionError(
            f"{what} needs the cryptography package: pip install 'fastquant[protect]' ({_CRYPTO_ERROR})"
        )


SIGNATURE_KEY = "fastquant_signature"
SIGNER_KEY = "fastquant_signer"
ENCRYPTION_ALGORITHM = "AES-256-GCM"
ENCRYPTED_FORMAT_VERSION = 2
KEY_ENV = "FASTQUANT_KEY"
KEY_FILE_ENV = "FASTQUANT_KEY_FILE"
# Domain separation: a signature or key id made for a fastquant manifest means nothing anywhere else.
_SIGNED_PREFIX = b"fastquant-manifest-v1\0"
_KEY_ID_PREFIX = b"fastquant-key-id-v1\0"
_TAG_BYTES = 16


class ProtectionError(ValueError):
    """A protected checkpoint that must not be loaded: bad signature, untrusted signer, wrong key, tampered data."""


# ---------------------------------------------------------------------------------------------- keys
def new_encryption_key() -> bytes:
    _need_crypto("an encryption key")
    return AESGCM.generate_key(bit_length=256)


def write_key_file(path: str | os.PathLike, key: bytes) -> Path:
    """Write a key as hex to a new file readable by its owner only (refuses to overwrite)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return path


def _parse_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ProtectionError(f"{source}: an encryption key must be 64 hex characters") from None
    if len(key) != 32:
        raise ProtectionError(f"{source}: an encryption key must be 32 bytes (64 hex characters), got {len(key)}")
    return key


def read_key_file(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no encryption key file at {path}")
    return _parse_key(path.read_text(encoding="ascii", errors="replace"), str(path))


def encryption_key_from_env() -> bytes | None:
    """The key in ``FASTQUANT_KEY`` or in the file named by ``FASTQUANT_KEY_FILE``; None when neither is set."""
    if os.environ.get(KEY_ENV):
        return _parse_key(os.environ[KEY_ENV], f"${KEY_ENV}")
    if os.environ.get(KEY_FILE_ENV):
        return read_key_file(os.environ[KEY_FILE_ENV])
    return None


def key_id(key: bytes) -> str:
    return hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()[:32]


def new_signing_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new Ed25519 private key (PEM, owner-only) to ``path`` and its public key to ``path`` + ``.pub``."""
    _need_crypto("a signing key")
    path = Path(path)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        crypto_serialization.Encoding.PEM,
        crypto_serialization.PrivateFormat.PKCS8,
        crypto_serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(
        private.public_key().public_bytes(
            crypto_serialization.Encoding.PEM, crypto_serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path, public_path


def read_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    _need_crypto("signing")
    key = crypto_serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ProtectionError(f"{path}: not an Ed25519 private key")
    return key


def read_public_key(source: str | os.PathLike | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A trusted signer: an Ed25519PublicKey, its 32 raw bytes, or a PEM file."""
    _need_crypto("checking a signature")
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, bytes) and len(source) == 32:
        return Ed25519PublicKey.from_public_bytes(source)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    key = crypto_serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ProtectionError(f"{source!r}: not an Ed25519 public key")
    return key


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(crypto_serialization.Encoding.Raw, crypto_serialization.PublicFormat.Raw)


def fingerprint(public: Ed25519PublicKey) -> str:
    """How a signer is named in errors and the audit log: sha256 of its raw public key, 32 hex characters."""
    return hashlib.sha256(_raw(public)).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- writing
def _aad(name: str, entry: dict[str, Any]) -> bytes:
    return json.dumps([name, entry["dtype"], entry["shape"]]).encode()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def protect_file(
    path: str | os.PathLike,
    *,
    sign_key: Ed25519PrivateKey | None = None,
    encryption_key: bytes | None = None,
) -> dict[str, Any]:
    """Sign and/or encrypt a checkpoint written by :func:`fastquant.save`, in place (atomically).

    Returns the new manifest."""
    from fastquant.serialization import METADATA_KEY, _sha256, read_manifest

    _need_crypto("protecting a checkpoint")
    path = Path(path)
    manifest = read_manifest(path)
    if "encryption" in manifest:
        raise ProtectionError(f"{path}: already encrypted")
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if encryption_key is not None:
        if len(encryption_key) != 32:
            raise ProtectionError("AES-256-GCM needs a 32-byte key")
        aead = AESGCM(encryption_key)
        for name, tensor in list(tensors.items()):
            entry = manifest["tensors"][name]
            nonce = secrets.token_bytes(12)
            ciphertext = aead.encrypt(nonce, _tensor_bytes(tensor), _aad(name, entry))
            stored = torch.frombuffer(bytearray(ciphertext), dtype=torch.uint8)
            tensors[name] = stored
            entry["nonce"] = nonce.hex()
            entry["sha256"] = _sha256(stored)
        manifest["encryption"] = {"algorithm": ENCRYPTION_ALGORITHM, "key_id": key_id(encryption_key)}
        manifest["format_version"] = ENCRYPTED_FORMAT_VERSION
    text = json.dumps(manifest, sort_keys=True)
    metadata = {METADATA_KEY: text}
    if sign_key is not None:
        metadata[SIGNATURE_KEY] = base64.b64encode(sign_key.sign(_SIGNED_PREFIX + text.encode())).decode()
        metadata[SIGNER_KEY] = base64.b64encode(_raw(sign_key.public_key())).decode()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(path.stat().st_mode & 0o777)  # keep the permissions fastquant.save gave the file
    os.replace(tmp, path)
    return manifest


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class Verified:
    """What :func:`check_before_loading` established about a checkpoint, for decryption and the audit log."""

    path: Path
    signer: str | None  # fingerprint of a trusted signer that signed the manifest, None when unsigned
    encrypted: bool
    _aead: Any = field(default=None, repr=False)  # an AESGCM for encrypted checkpoints

    def decrypt(self, name: str, stored: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
        if self._aead is None:
            return stored
        try:
            plain = self._aead.decrypt(bytes.fromhex(entry["nonce"]), _tensor_bytes(stored), _aad(name, entry))
        except InvalidTag:
            raise ProtectionError(
                f"{self.path}: tensor {name!r} fails AES-GCM authentication (tampered ciphertext or moved tensor)"
            ) from None
        dtype = TENSOR_DTYPES[entry["dtype"]][0]
        if not plain:  # torch.frombuffer refuses an empty buffer
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(plain), dtype=torch.uint8).view(dtype).reshape(entry["shape"])


def _header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def check_before_loading(
    path: Path,
    manifest: dict[str, Any],
    *,
    trusted_keys: Iterable[Any] | None = None,
    decryption_key: bytes | None = None,
) -> Verified:
    """Signature, key and header checks that need no tensor data, run before anything is allocated.

    With ``trusted_keys`` a valid signature by one of them is required. Every stored tensor's header dtype and
    shape must agree with its manifest entry (safetensors has already checked that the header's byte ranges fit
    the file, so after this check no manifest size can exceed what the file holds).
    """
    from fastquant.serialization import METADATA_KEY

    try:
        metadata = _header_metadata(path)
    except (SafetensorError, OSError) as exc:
        raise ProtectionError(f"{path}: not a readable safetensors file: {exc}") from exc
    trusted = [read_public_key(k) for k in trusted_keys] if trusted_keys is not None else None
    signer = _check_signature(path, metadata.get(METADATA_KEY, ""), metadata, trusted)

    encryption = manifest.get("encryption")
    aead = None
    if encryption is not None:
        if not isinstance(encryption, dict) or encryption.get("algorithm") != ENCRYPTION_ALGORITHM:
            raise ProtectionError(f"{path}: unknown encryption {encryption!r}")
        _need_crypto(f"{path}: decrypting")
        key = decryption_key if decryption_key is not None else encryption_key_from_env()
        if key is None:
            raise ProtectionError(
                f"{path}: the tensors are encrypted: set {KEY_ENV} or {KEY_FILE_ENV}, or pass decryption_key"
            )
        if key_id(key) != encryption.get("key_id"):
            raise ProtectionError(f"{path}: wrong decryption key (the checkpoint names another key id)")
        aead = AESGCM(key)

    tensors = manifest["tensors"]
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(tensors):
            raise ProtectionError(f"{path}: the manifest and the stored tensors disagree (file edited?)")
        for name in names:
            entry = tensors[name]
            if (
                not isinstance(entry, dict)
                or entry.get("dtype") not in TENSOR_DTYPES
                or not _is_shape(entry.get("shape"))
            ):
                raise ProtectionError(f"{path}: invalid manifest entry for tensor {name!r}")
            stored = f.get_slice(name)
            got_dtype, got_shape = stored.get_dtype(), list(stored.get_shape())
            if encryption is not None:
                itemsize = TENSOR_DTYPES[entry["dtype"]][0].itemsize
                numel = 1
                for d in entry["shape"]:
                    numel *= d
                want_dtype, want_shape = "U8", [numel * itemsize + _TAG_BYTES]
                if not isinstance(entry.get("nonce"), str) or len(entry["nonce"]) != 24:
                    raise ProtectionError(f"{path}: tensor {name!r} has no valid nonce")
            else:
                want_dtype, want_shape = TENSOR_DTYPES[entry["dtype"]][1], entry["shape"]
            if got_dtype != want_dtype or got_shape != want_shape:
                raise ProtectionError(
                    f"{path}: tensor {name!r} is stored as {got_dtype}{got_shape} but the manifest "
                    f"implies {want_dtype}{want_shape} (file edited?)"
                )
    return Verified(path=path, signer=signer, encrypted=encryption is not None, _aead=aead)


# The dtypes a state dict may hold, by manifest name: the torch dtype and the safetensors header name.
TENSOR_DTYPES = {
    "float32": (torch.float32, "F32"),
    "float64": (torch.float64, "F64"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "int16": (torch.int16, "I16"),
    "int32": (torch.int32, "I32"),
    "int64": (torch.int64, "I64"),
    "bool": (torch.bool, "BOOL"),
}


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)


def _check_signature(
    path: Path, text: str, metadata: dict[str, str], trusted: list[Ed25519PublicKey] | None
) -> str | None:
    signature, signer = metadata.get(SIGNATURE_KEY), metadata.get(SIGNER_KEY)
    if signature is None:
        if trusted is not None:
            raise ProtectionError(f"{path}: the checkpoint is not signed, and a signature by a trusted key is required")
        return None
    _need_crypto(f"{path}: checking its signature")
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signer or "", validate=True))
        raw_signature = base64.b64decode(signature, validate=True)
    except ValueError:
        raise ProtectionError(f"{path}: malformed signature or signer entry in the header") from None
    if trusted is not None and _raw(public) not in {_raw(k) for k in trusted}:
        raise ProtectionError(f"{path}: signed by {fingerprint(public)}, which is not a trusted key")
    try:
        public.verify(raw_signature, _SIGNED_PREFIX + text.encode())
    except InvalidSignature:
        raise ProtectionError(f"{path}: the manifest signature is invalid (manifest edited after signing)") from None
    # An untrusted but valid signature still catches accidental edits; only trusted_keys make it an identity.
    return fingerprint(public) if trusted is not None else None
