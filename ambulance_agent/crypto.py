"""Per-unit encryption of payloads at rest (the agent's outbox on the vehicle's disk): AES-256-GCM.

Why: an ambulance's computer can be stolen or sold; its outbox holds vital signs and ECG waiting for a link.
Each unit has its own 256-bit key (provisioned with the unit, kept in a file readable by the agent's user only,
ideally in the vehicle computer's TPM-backed key store), so one lost vehicle exposes neither the others' data
nor a shared secret.

Sealed layout (bytes)::

    b"GHC1" | key id (8 bytes: SHA-256 of the key, truncated) | nonce (12 random bytes) | ciphertext | GCM tag (16)

* The associated data binds a blob to its unit and to the caller's ``context`` (for the outbox: the stream, the
  ``seq``, the topic, QoS, retain flag, store time and size), so a row copied onto another row, or another unit's
  disk, does not decrypt.
* Random 96-bit nonces: NIST SP 800-38D section 8.3 caps one key at 2**32 seals; at 20 payloads/s a key lasts
  about 6.8 years of continuous streaming.  Rotate earlier: :class:`UnitCipher` takes the new key plus the old
  ones, seals with the new and opens with any.
* Failures raise :class:`CryptoError` with a reason safe to log (never key material or plaintext).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["MAGIC", "CryptoError", "UnitCipher", "development_unit_key", "generate_unit_key", "load_unit_key"]

MAGIC = b"GHC1"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = len(MAGIC) + _KEY_ID_BYTES + _NONCE_BYTES


class CryptoError(Exception):
    """A blob that cannot be opened, or a key that cannot be used.  ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def generate_unit_key() -> bytes:
    """A fresh 256-bit key for one unit (provisioning)."""
    return AESGCM.generate_key(bit_length=256)


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"goldenhour-unit-key" + key).digest()[:_KEY_ID_BYTES]


def load_unit_key(path: Path) -> bytes:
    """Read a unit key file: 32 raw bytes or their base64 (urlsafe or standard).

    Raises:
        CryptoError: the file is readable or writable by group or others, or does not hold a 256-bit key.
    """
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CryptoError("unit key file must be accessible to its owner only (chmod 600)")
    data = path.read_bytes().strip()
    if len(data) != 32:
        try:
            data = base64.urlsafe_b64decode(data.replace(b"+", b"-").replace(b"/", b"_") + b"=" * (-len(data) % 4))
        except ValueError:
            raise CryptoError("unit key file does not hold a key") from None
    if len(data) != 32:
        raise CryptoError("unit key must be 256 bits")
    return data


def development_unit_key(path: Path) -> bytes:
    """The key in ``path``, created first (a fresh key, mode 600, base64) if the file does not exist.

    For development and simulation only: in production the key is provisioned with the unit, never generated
    beside the data it protects.

    Raises:
        CryptoError: as :func:`load_unit_key`.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: read theirs
            return load_unit_key(path)
        with os.fdopen(fd, "wb") as out:
            out.write(base64.urlsafe_b64encode(generate_unit_key()))
    return load_unit_key(path)


class UnitCipher:
    """Seal and open one unit's payloads.

    Args:
        unit_id: the unit the blobs belong to (bound into every blob).
        key: the current 256-bit key (seals and opens).
        previous_keys: retired keys still accepted for opening (rotation).
    """

    def __init__(self, unit_id: str, key: bytes, previous_keys: Sequence[bytes] = ()) -> None:
        for k in (key, *previous_keys):
            if len(k) != 32:
                raise CryptoError("unit key must be 256 bits")
        self.unit_id = unit_id
        self._current = (_key_id(key), AESGCM(key))
        self._keys = {_key_id(k): AESGCM(k) for k in (key, *previous_keys)}

    def _aad(self, context: bytes) -> bytes:
        unit = self.unit_id.encode("ascii")
        return MAGIC + len(unit).to_bytes(1, "big") + unit + context

    def is_current(self, blob: bytes) -> bool:
        """Whether ``blob`` is sealed (header only, not authenticated) with the current key."""
        return blob.startswith(MAGIC) and blob[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES] == self._current[0]

    def holds_key_of(self, blob: bytes) -> bool:
        """Whether ``blob`` looks sealed (header only) with a key this cipher holds (current or previous)."""
        return blob.startswith(MAGIC) and blob[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES] in self._keys

    def seal(self, plaintext: bytes, *, context: bytes = b"") -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to this unit and ``context``."""
        key_id, aead = self._current
        nonce = os.urandom(_NONCE_BYTES)
        return MAGIC + key_id + nonce + aead.encrypt(nonce, plaintext, self._aad(context))

    def open(self, blob: bytes, *, context: bytes = b"") -> bytes:
        """The plaintext of a sealed blob.

        Raises:
            CryptoError: not a sealed blob, unknown key, or tampered / another unit's / another context's blob.
        """
        if len(blob) < _HEADER_BYTES + _TAG_BYTES or not blob.startswith(MAGIC):
            raise CryptoError("not a sealed payload")
        key_id = blob[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES]
        aead = self._keys.get(key_id)
        if aead is None:
            raise CryptoError("sealed with a key this unit does not hold")
        nonce = blob[len(MAGIC) + _KEY_ID_BYTES : _HEADER_BYTES]
        try:
            return aead.decrypt(nonce, blob[_HEADER_BYTES:], self._aad(context))
        except InvalidTag:
            raise CryptoError("payload fails authentication (tampered, or another unit's or row's)") from None


def _bench(messages: int = 5_000, payload_bytes: int = 700) -> None:
    """``python -m ambulance_agent.crypto``: outbox put + pending + ack per message, sealed vs clear, same run."""
    import tempfile
    import time

    from ambulance_agent.outbox import Outbox
    from broker_config import Stream, TopicSpace

    topic = TopicSpace().topic(Stream.ECG, "bench")
    body = os.urandom(payload_bytes)  # an ECG chunk of 1 s, 2 leads at 360 Hz is ~700 bytes on the wire
    results: dict[str, float] = {}
    for label, cipher in (("clear", None), ("sealed", UnitCipher("bench", generate_unit_key()))):
        with tempfile.TemporaryDirectory() as tmp:
            box = Outbox(Path(tmp) / "o.db", cipher=cipher)
            started = time.perf_counter()
            for _ in range(messages):
                box.put(Stream.ECG, topic, lambda seq: body)
            while batch := box.pending(64):
                for message in batch:
                    box.ack(message.id)
            results[label] = (time.perf_counter() - started) / messages * 1e6
            box.close()
    print(f"outbox put+pending+ack, {messages} x {payload_bytes} B ECG chunks")  # noqa: T201
    print(f"  clear  {results['clear']:7.1f} us/message (baseline)")  # noqa: T201
    ratio = results["sealed"] / results["clear"]
    print(f"  sealed {results['sealed']:7.1f} us/message (ratio {ratio:.2f} to clear)")  # noqa: T201


if __name__ == "__main__":
    _bench()
