"""Encryption at rest: a model directory's weight files sealed with AES-256-GCM.

`lmforge encrypt DIR` replaces each `*.safetensors` with `*.safetensors.enc` and writes
`encryption.json`; config, tokenizer and lmforge.json stay readable. A file is sealed in
chunks (4 MiB), each with its own nonce (a random per-file prefix + the chunk number)
and, as associated data, the file's header, its own name, the chunk number and whether
it is the last chunk: a flipped bit, a reordered, dropped or appended chunk, a truncated
file or two files swapped all fail authentication. A key check in encryption.json tells
a wrong key from a tampered file.

Keys are 32 random bytes, given as a file (raw, hex or base64) or an environment
variable (hex or base64). Loading decrypts the weight files into memory, never to disk,
so an encrypted model needs about twice its size in memory while it loads.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LmforgeError

MAGIC = b"LMFENC01"
CHUNK = 4 << 20
TAG = 16
HEADER = struct.Struct("<8s8sIQ")  # magic, nonce prefix, chunk size, plaintext size
KEY_CHECK = b"lmforge key check"
ENCRYPTION_FILE = "encryption.json"
KEY_ENV = "LMFORGE_MODEL_KEY"  # read when no key is passed, so every command (serve, chat, eval) takes one

# The key a command was given (--key-file / --key-env, see `commands.with_model_key`): every
# encrypted model the command loads without a key of its own is opened with it.
_command_key: bytes | None = None
_command_key_source: tuple[Path | None, str | None] = (None, None)  # the key file, the variable


@contextmanager
def command_key(key: bytes | None, source: tuple[Path | None, str | None] = (None, None)):
    """Within the block, encrypted models loaded without a key use `key` (read from `source`)."""
    global _command_key, _command_key_source
    previous = _command_key, _command_key_source
    _command_key, _command_key_source = key, source
    try:
        yield
    finally:
        _command_key, _command_key_source = previous


def command_key_source() -> tuple[Path | None, str | None]:
    """Where the command's key came from (--key-file's path, --key-env's name): for processes that
    must read it themselves, such as `serve --ray`'s replicas, so that the key is never sent."""
    return _command_key_source


def given_key(key: bytes | None) -> bytes | None:
    """The key to open a model with: the one passed, else the command's, else $LMFORGE_MODEL_KEY's."""
    if key is None:
        key = _command_key
    if key is None and os.environ.get(KEY_ENV):
        key = parse_key(os.environ[KEY_ENV])
    return key


def _aesgcm(key: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise LmforgeError("encryption needs the cryptography package: pip install 'lmforge[crypto]'") from None
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise LmforgeError("the key must be 32 bytes (AES-256)")
    return AESGCM(bytes(key))


def parse_key(text: str | bytes) -> bytes:
    """32 raw bytes, or their hex (64 characters) or base64 (44 characters) text."""
    if isinstance(text, (bytes, bytearray)) and len(text) == 32:
        return bytes(text)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise LmforgeError("the key is neither 32 raw bytes nor hex/base64 text") from None
    text = text.strip()
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == 32:
            return key
    raise LmforgeError("the key must be 32 bytes: give 64 hex characters or 44 base64 characters")


def read_key(key_file: Path | None = None, key_env: str | None = None) -> bytes:
    if key_file is not None:
        try:
            return parse_key(Path(key_file).read_bytes())
        except OSError as e:
            raise LmforgeError(f"cannot read key file {key_file}: {e.strerror}") from None
    if key_env is not None:
        value = os.environ.get(key_env)
        if not value:
            raise LmforgeError(f"environment variable {key_env} is not set")
        return parse_key(value)
    raise LmforgeError("no key given: use --key-file FILE or --key-env VAR")


def new_key_file(path: Path) -> bytes:
    """A fresh random key, written as hex to a file only its owner can read."""
    path = Path(path)
    if path.exists():
        raise LmforgeError(f"{path} already exists; not overwriting a key")
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def _aad(header: bytes, name: str, index: int, last: bool) -> bytes:
    return header + name.encode() + struct.pack("<QB", index, last)


def encrypt_file(src: Path, dst: Path, key: bytes, name: str) -> None:
    aes = _aesgcm(key)
    size = src.stat().st_size
    prefix = os.urandom(8)
    header = HEADER.pack(MAGIC, prefix, CHUNK, size)
    count = max(1, -(-size // CHUNK))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header)
        for i in range(count):
            chunk = fin.read(CHUNK)
            fout.write(aes.encrypt(prefix + struct.pack(">I", i), chunk, _aad(header, name, i, i == count - 1)))


def decrypt_bytes(path: Path, key: bytes, name: str) -> bytearray:
    """The plaintext of one sealed file, authenticated chunk by chunk."""
    from cryptography.exceptions import InvalidTag

    aes = _aesgcm(key)
    with open(path, "rb") as f:
        header = f.read(HEADER.size)
        if len(header) < HEADER.size:
            raise LmforgeError(f"{path} is truncated: no encryption header")
        magic, prefix, chunk, size = HEADER.unpack(header)
        if magic != MAGIC or not 0 < chunk <= 1 << 30:
            raise LmforgeError(f"{path} is not a file sealed by lmforge encrypt")
        count = max(1, -(-size // chunk))
        expected = HEADER.size + size + count * TAG
        actual = path.stat().st_size
        if actual != expected:
            raise LmforgeError(f"{path} is {actual:,} bytes but its header implies {expected:,}: truncated or tampered with")
        out = bytearray(size)
        view = memoryview(out)
        for i in range(count):
            n = min(chunk, size - i * chunk)
            sealed = f.read(n + TAG)
            try:
                view[i * chunk:i * chunk + n] = aes.decrypt(prefix + struct.pack(">I", i), sealed,
                                                            _aad(header, name, i, i == count - 1))
            except InvalidTag:
                raise LmforgeError(f"{path} failed authentication at chunk {i}: the file was tampered with "
                                   "or corrupted (the key itself is right)") from None
    return out


def _key_check(key: bytes) -> str:
    nonce = os.urandom(12)
    return (nonce + _aesgcm(key).encrypt(nonce, KEY_CHECK, None)).hex()


def check_key(folder: Path, key: bytes | None) -> dict:
    from cryptography.exceptions import InvalidTag

    from lmforge.model_files import read_json

    record = read_json(folder / ENCRYPTION_FILE)
    key = given_key(key)
    if key is None:
        raise LmforgeError(f"{folder} is encrypted: give its key (--key-file / --key-env, key= in lmforge.load, "
                           f"or the environment variable {KEY_ENV})")
    try:
        blob = bytes.fromhex(record.get("key_check", ""))
        _aesgcm(key).decrypt(blob[:12], blob[12:], None)
    except (InvalidTag, ValueError):
        raise LmforgeError(f"wrong key for {folder} (or its {ENCRYPTION_FILE} was altered)") from None
    files = record.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and Path(k).name == k and v == k + ".enc" for k, v in files.items()):
        raise LmforgeError(f"{folder / ENCRYPTION_FILE} lists its files wrongly")
    return record


def encrypt_model_dir(folder: str | Path, key: bytes) -> list[str]:
    """Seal every weight file in place; plaintext is removed only after everything is written."""
    from lmforge.model_files import sha256_file, weight_files

    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"model directory {folder} not found")
    if (folder / ENCRYPTION_FILE).exists():
        raise LmforgeError(f"{folder} is already encrypted")
    _aesgcm(key)
    files = weight_files(folder)
    sealed = []
    try:
        for src in files:
            partial = src.with_name(src.name + ".enc.partial")
            encrypt_file(src, partial, key, src.name)
            sealed.append(partial)
        for partial in sealed:
            partial.rename(partial.with_suffix(""))  # .enc.partial -> .enc
    except BaseException:
        for p in sealed:
            p.unlink(missing_ok=True)
        raise
    record = {"algorithm": "AES-256-GCM", "format": "lmforge-chunked-v1", "chunk_bytes": CHUNK,
              "files": {f.name: f.name + ".enc" for f in files}, "key_check": _key_check(key),
              "weights": {f.name + ".enc": sha256_file(folder / (f.name + ".enc")) for f in files}}
    (folder / ENCRYPTION_FILE).write_text(json.dumps(record, indent=2))
    for f in files:
        f.unlink()
    return [f.name for f in files]


def decrypt_model_dir(folder: str | Path, key: bytes | None) -> list[str]:
    folder = Path(folder)
    if not (folder / ENCRYPTION_FILE).is_file():
        raise LmforgeError(f"{folder} is not encrypted (no {ENCRYPTION_FILE})")
    record = check_key(folder, key)
    key = given_key(key)
    plain = {name: decrypt_bytes(folder / sealed, key, name) for name, sealed in record["files"].items()}
    for name, data in plain.items():  # all authenticated before anything is replaced
        partial = folder / (name + ".partial")
        partial.write_bytes(data)
        partial.rename(folder / name)
    (folder / ENCRYPTION_FILE).unlink()
    for sealed in record["files"].values():
        (folder / sealed).unlink()
    return list(plain)


def decrypted_source(folder: Path, key: bytes | None):
    """The weights of an encrypted directory, each file decrypted into memory when first read."""
    from lmforge.interop.safetensors_io import MemoryFile
    from lmforge.interop.weights import SafetensorsFiles
    from lmforge.model_files import WEIGHTS_INDEX, weight_index

    record = check_key(folder, key)
    key = given_key(key)
    plain: dict[Path, bytearray] = {}

    def opener(path: Path) -> MemoryFile:
        if path not in plain:
            if path.name not in record["files"]:
                raise LmforgeError(f"{path.name} is not among the encrypted files of {folder}")
            plain[path] = decrypt_bytes(folder / record["files"][path.name], key, path.name)
        return MemoryFile(plain[path])

    index = weight_index(folder) if (folder / WEIGHTS_INDEX).is_file() else None
    names = sorted(set(index.values())) if index else list(record["files"])
    return SafetensorsFiles([folder / n for n in names], index, opener=opener)
