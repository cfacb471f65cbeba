"""Signed runs: an Ed25519 signature over a run's name and digest, in a DSSE envelope.

A run is named by its digest (the SHA-256 of its canonical manifest), and the manifest names
every file by its SHA-256, so signing the digest signs every byte of the run, the way OpenSSF
``model-signing`` signs a manifest of file hashes. The signature is a small JSON file,
``aptrun.sig``, in the DSSE format (Dead Simple Signing Envelope, which Sigstore and in-toto
use)::

    {"payloadType": "application/vnd.aptbundle.run+json",
     "payload": base64({"_type": "aptbundle-run-signature/v1", "name": NAME, "digest": DIGEST}),
     "signatures": [{"keyid": KEYID, "sig": base64(Ed25519(PAE(payloadType, payload)))}]}

``PAE`` is DSSE's pre-authentication encoding (``"DSSEv1" SP len(type) SP type SP len(body) SP
body``); ``KEYID`` is the SHA-256 of the raw 32-byte public key, in hex. Keys are PEM files:
``aptbundle keygen KEY`` writes ``KEY`` (PKCS#8 private key, mode 0600) and ``KEY.pub``.

The file travels inside an archive (``NAME/aptrun.sig``, right after the manifest, so plain
``tar --zstd -xf`` still works), next to a manifest in a store (``manifests/…/DIGEST.sig``) and
in an unpacked run folder. It is never listed in the manifest: it signs the manifest. Nothing
here trusts the envelope: it is parsed with a size cap, and only a signature that verifies
under a key the user named counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from aptbundle.format.manifest import SIGNATURE_NAME
from aptbundle.ground.errors import AptBundleError, SignatureError
from aptbundle.ground.fsutil import read_capped

__all__ = ["SIGNATURE_NAME", "check", "keygen", "load_public_key", "parse_envelope", "sign", "signed_by"]
PAYLOAD_TYPE = "application/vnd.aptbundle.run+json"
STATEMENT_TYPE = "aptbundle-run-signature/v1"
MAX_SIGNATURE_BYTES = 64 * 1024


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise SignatureError("signatures need the 'cryptography' package; pip install cryptography") from None
    return serialization, ed25519


def _pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


@dataclass(frozen=True)
class PublicKey:
    """A trusted key: where it came from, its id, and the key itself."""

    source: str
    keyid: str
    key: object

    def verify(self, sig: bytes, message: bytes) -> bool:
        try:
            self.key.verify(sig, message)
            return True
        except Exception:  # cryptography's InvalidSignature, or a signature of the wrong length
            return False


def _keyid(public) -> str:
    serialization, _ = _crypto()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def keygen(path: str | Path, *, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: ``PATH`` (private, 0600) and ``PATH.pub``; their key id."""
    serialization, ed25519 = _crypto()
    priv_path, pub_path = Path(path), Path(str(path) + ".pub")
    for p in (priv_path, pub_path):
        if (p.exists() or p.is_symlink()) and not force:
            raise SignatureError(f"{p}: already exists; choose another name or pass --force to replace it")
    if not priv_path.parent.is_dir():
        raise SignatureError(f"{priv_path.parent}: no such folder; create it or choose another key path")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for p, data, mode in ((priv_path, priv, 0o600), (pub_path, pub, 0o644)):
        if force:
            p.unlink(missing_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with open(fd, "wb") as f:
            f.write(data)
    return priv_path, pub_path, _keyid(key.public_key())


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        data = read_capped(path, MAX_SIGNATURE_BYTES)
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the {what} ({e.strerror or e}); give the file"
                             f" `aptbundle keygen` wrote") from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: over {MAX_SIGNATURE_BYTES} bytes; expected a PEM {what}")
    return data


def load_private_key(path: str | Path):
    """The Ed25519 private key in a PEM file (as ``aptbundle keygen`` writes it)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(_read_key_file(path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({e}); give the KEY file"
                             " `aptbundle keygen KEY` wrote (not KEY.pub)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}; expected an Ed25519 key (`aptbundle keygen`)")
    return key


def load_public_key(path: str | Path) -> PublicKey:
    """A trusted public key from a PEM file (``KEY.pub``)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        if b"PRIVATE KEY" in data:
            raise SignatureError(f"{path}: is a private key; --trust takes the public one (KEY.pub)") from None
        raise SignatureError(f"{path}: not a PEM public key; --trust takes the KEY.pub file"
                             " `aptbundle keygen KEY` wrote") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}; expected an Ed25519 public key")
    return PublicKey(str(path), _keyid(key), key)


def sign(name: str, digest: str, key_path: str | Path) -> bytes:
    """The envelope (``aptrun.sig`` bytes) signing run ``name`` at ``digest`` with the key."""
    key = load_private_key(key_path)
    body = json.dumps({"_type": STATEMENT_TYPE, "name": name, "digest": digest},
                      sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(_pae(PAYLOAD_TYPE, body))
    env = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(),
           "signatures": [{"keyid": _keyid(key.public_key()), "sig": base64.b64encode(sig).decode()}]}
    return (json.dumps(env, sort_keys=True, indent=1) + "\n").encode()


@dataclass(frozen=True)
class Envelope:
    """A parsed ``aptrun.sig``: what it claims and its signatures (not yet verified)."""

    name: str
    digest: str
    message: bytes  # the PAE the signatures are over
    signatures: tuple[tuple[str, bytes], ...]  # (keyid as claimed, signature)


def _b64(value, shown: str, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{shown}: {what} is not a base64 string; the signature file is damaged or crafted")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise SignatureError(f"{shown}: {what} is not valid base64; the signature file is damaged or crafted") from None


def parse_envelope(data: bytes, shown: str) -> Envelope:
    """Parse the envelope strictly; a clear ``SignatureError`` for anything else."""
    bad = f"{shown}: not an aptbundle signature"
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{bad} ({len(data)} bytes, over the {MAX_SIGNATURE_BYTES}-byte limit)")
    try:
        env = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SignatureError(f"{bad} (not JSON); the signature file is damaged or crafted") from None
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"{bad} (payloadType is not {PAYLOAD_TYPE!r})")
    body = _b64(env.get("payload"), shown, "payload")
    try:
        stmt = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SignatureError(f"{bad} (its payload is not JSON)") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE or \
            not isinstance(stmt.get("name"), str) or not isinstance(stmt.get("digest"), str):
        raise SignatureError(f"{bad} (its payload is not a {STATEMENT_TYPE} statement)")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not 1 <= len(sigs) <= 16:
        raise SignatureError(f"{bad} (expected 1 to 16 signatures)")
    out = []
    for s in sigs:
        if not isinstance(s, dict):
            raise SignatureError(f"{bad} (a signature is not an object)")
        keyid = s.get("keyid", "")
        out.append((keyid if isinstance(keyid, str) else "", _b64(s.get("sig"), shown, "a signature")))
    return Envelope(stmt["name"][:256], stmt["digest"][:128], _pae(PAYLOAD_TYPE, body), tuple(out))


def check(data: bytes | None, name: str, digest: str, trusted: list[PublicKey], shown: str) -> PublicKey:
    """Check that ``data`` signs run ``name`` at ``digest`` with one of the ``trusted`` keys.

    Returns the key that signed; refuses (``SignatureError``) an unsigned run, a signature by
    any other key, and a signature of another run or another state of this one.
    """
    have = ", ".join(k.keyid[:16] for k in trusted)
    if data is None:
        raise SignatureError(f"{shown}: is not signed; --trust asks for a signature by {have}."
                             " Ask its author for a signed copy (`pack --sign` / `push --sign`)")
    env = parse_envelope(data, shown)
    signer = next((k for k in trusted for _, sig in env.signatures if k.verify(sig, env.message)), None)
    if signer is None:
        claimed = ", ".join(k[:16] or "?" for k, _ in env.signatures)
        raise SignatureError(f"{shown}: signed by key {claimed}, which --trust does not name (trusted: {have});"
                             " refusing it. Do not use it unless you trust its signer")
    if env.digest != digest or env.name != name:
        raise SignatureError(f"{shown}: the signature (key {signer.keyid[:16]}) is for run {env.name!r} at digest"
                             f" {env.digest[:16]}…, not this run {name!r} at {digest[:16]}…; the run was changed"
                             " after it was signed")
    return signer


def signed_by(data: bytes | None, name: str, digest: str) -> str | None:
    """A short description of an unchecked signature, for ``inspect`` (never a verdict)."""
    if data is None:
        return None
    try:
        env = parse_envelope(data, SIGNATURE_NAME)
    except AptBundleError:
        return "unreadable signature"
    keys = ", ".join(k[:16] or "?" for k, _ in env.signatures)
    same = env.digest == digest and env.name == name
    return f"key {keys}" + ("" if same else " (for another state of the run)")
