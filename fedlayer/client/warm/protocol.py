"""The warm worker's wire: where its socket is, bounded frames, peer checks, the code handshake.

Standard library only: the forwarding ClientApp imports this module in every
``flwr-clientapp`` process, so it must cost nothing to import.

A connection carries one request. Every frame is an 8-byte big-endian length
and that many bytes; a length above ``MAX_FRAME`` is refused before anything
is read. Control frames are JSON objects; the Message and the Context travel
as Flower's own protobuf (``flwr.common.serde``), never pickle.

    client -> worker  {"protocol": 1, "code": <digest>}
    worker -> client  {"protocol": 1, "code": <digest>}      (then closes when they differ)
    client -> worker  <Message proto> <Context proto>
    worker -> client  {"deadline": <s>}                      (accepted)
    worker -> client  {"ok": true} <Message proto> <Context proto>
                   or {"ok": false, "error": "<type>: <text>"}
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

PROTOCOL = 1
#: Largest frame either side sends or accepts (a Message with a big model).
MAX_FRAME = 512 * 1024 * 1024
#: Folder under a node's ``state-dir`` holding the socket (mode 0700).
FOLDER = "warm"
SOCKET = "worker.sock"
_HEADER = struct.Struct(">Q")
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


class ProtocolError(ConnectionError):
    """The peer broke the protocol (a bad, oversized or missing frame); the connection is dropped."""


class FrameTooLarge(ProtocolError):
    """A frame longer than ``MAX_FRAME``."""


class PeerRefused(ConnectionError):
    """The peer runs as another user."""


def socket_folder(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / FOLDER


def private_folder(state_dir: str | os.PathLike[str]) -> Path:
    """The socket's folder, created 0700; refused when another user owns it."""
    folder = socket_folder(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        folder.chmod(0o700)
    return folder


def socket_address(path: Path) -> tuple[str, int | None]:
    """An address ``bind``/``connect`` accept for ``path``, and a folder descriptor to close after.

    A path longer than a Unix socket address holds goes through the folder's
    descriptor (``/proc/self/fd/N/worker.sock``, Linux).
    """
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        return str(path), None
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{folder}/{path.name}", folder


def connect(path: Path, timeout: float) -> socket.socket:
    """A connection to the worker at ``path`` (``OSError`` when none listens)."""
    address, folder = socket_address(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    finally:
        if folder is not None:
            os.close(folder)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end (``SO_PEERCRED``: pid, uid, gid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_peer(sock: socket.socket, uid: int) -> None:
    """Refuse a peer that does not run as ``uid``."""
    found = peer_uid(sock)
    if found != uid:
        raise PeerRefused(f"peer runs as uid {found}, only uid {uid} may use this worker")


def send_frame(sock: socket.socket, payload: bytes) -> None:
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte bound")
    header = _HEADER.pack(len(payload))
    if len(payload) < 65536:  # one write; a large payload is not copied
        sock.sendall(header + payload)
    else:
        sock.sendall(header)
        sock.sendall(payload)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ProtocolError(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buffer)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    """One frame; ``FrameTooLarge`` for a length above ``limit``, without reading it."""
    (size,) = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    if size > limit:
        raise FrameTooLarge(f"peer announced a frame of {size} bytes; the bound is {limit}")
    return _read_exactly(sock, size)


def send_json(sock: socket.socket, value: dict[str, Any]) -> None:
    send_frame(sock, json.dumps(value).encode())


def recv_json(sock: socket.socket) -> dict[str, Any]:
    """A control frame (small: bounded to 64 KiB)."""
    try:
        value = json.loads(recv_frame(sock, limit=65536))
    except ValueError as err:
        raise ProtocolError(f"control frame is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ProtocolError("control frame is not a JSON object")
    return value


def hello(cache: Path | None = None) -> dict[str, Any]:
    """This side's handshake. ``cache``: a private folder where ``cached_code_digest`` keeps the digest,
    unless this process has hashed its sources already (``code_digest``: the code it loaded then)."""
    pinned = code_digest.cache_info().currsize > 0
    return {"protocol": PROTOCOL, "code": code_digest() if cache is None or pinned else cached_code_digest(cache)}


def _package() -> Path:
    return Path(__file__).resolve().parents[2]


def _sources(package: Path) -> dict[str, os.stat_result]:
    """fedlayer's ``.py`` files (no ``__pycache__``): path relative to ``package`` -> its ``stat``, in a fixed order."""
    found: dict[str, os.stat_result] = {}
    pending = [("", str(package))]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":
                        pending.append((prefix + entry.name + "/", entry.path))
                elif entry.name.endswith(".py"):
                    found[prefix + entry.name] = entry.stat()
    return {relative: found[relative] for relative in sorted(found, key=lambda relative: relative.split("/"))}


def _hash_sources(package: Path, sources: dict[str, os.stat_result]) -> str:
    digest = hashlib.sha256()
    for relative in sources:
        digest.update(relative.encode() + b"\0")
        digest.update((package / relative).read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of fedlayer's Python sources as this process loads them (path and bytes of every ``.py``).

    The forwarding side (the run's app, from the FAB) and the worker (the
    device's installed fedlayer) compare it, so a worker never answers for
    code other than the app the run ships. The worker hashes once, at its
    start; the forwarding side, a fresh process per message, through
    ``cached_code_digest``.
    """
    package = _package()
    return _hash_sources(package, _sources(package))


#: ``cached_code_digest``'s file, in the node's private socket folder.
DIGEST_CACHE = "code-digests.json"
#: Packages (folders) the cache remembers: an installed fedlayer and the runs' FAB copies.
DIGEST_CACHE_ENTRIES = 8
#: A file changed less than this long before hashing leaves its digest uncached: file times are
#: coarse (a kernel tick), so a second same-size write within one tick would keep the first's times.
RACY_SECONDS = 2.0


def _stat_fingerprint(sources: dict[str, os.stat_result]) -> tuple[str, int]:
    """A hash of every source's path, size, inode, mtime and ctime, and the newest of those times (ns).

    The ctime changes with every write and cannot be set back (unlike the
    mtime: ``touch -d``, ``os.utime``), so an edited file changes it even when
    its size and mtime come out the same.
    """
    digest, newest = hashlib.sha256(), 0
    for relative, info in sources.items():
        digest.update(f"{relative}\0{info.st_size}\0{info.st_dev}:{info.st_ino}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\n".encode())
        newest = max(newest, info.st_mtime_ns, info.st_ctime_ns)
    return digest.hexdigest(), newest


def cached_code_digest(folder: Path) -> str:
    """``code_digest()``, kept in ``folder/DIGEST_CACHE`` against the sources' file metadata.

    The forwarding ClientApp runs in a fresh process per message; reading and
    hashing ~100 files there costs milliseconds per message, a ``stat`` of each
    a fraction of that. The digest is hashed again whenever a file is added,
    removed, replaced or written (``_stat_fingerprint``), and not kept while a
    file is younger than ``RACY_SECONDS`` or changed during the hashing.
    ``folder`` is the node's private (0700) socket folder, so only the user
    who could edit the code itself can edit the cache; a folder that is not
    private is not used. A cache that cannot be read or written is ignored:
    the digest is then hashed every time.
    """
    package = _package()
    sources = _sources(package)
    fingerprint, newest = _stat_fingerprint(sources)
    path, key = folder / DIGEST_CACHE, str(package)
    try:
        info = folder.stat()
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise PermissionError(f"{folder} is not private to this user")
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except PermissionError:
        return _hash_sources(package, sources)
    except (OSError, ValueError):
        entries = {}
    known = entries.get(key)
    if isinstance(known, dict) and known.get("stat") == fingerprint and isinstance(known.get("code"), str):
        return known["code"]
    hashed_at = time.time_ns()
    code = _hash_sources(package, sources)
    if newest < hashed_at - RACY_SECONDS * 1e9 and _stat_fingerprint(_sources(package))[0] == fingerprint:
        entries.pop(key, None)
        entries[key] = {"stat": fingerprint, "code": code}
        _write_private(path, dict(list(entries.items())[-DIGEST_CACHE_ENTRIES:]))
    return code


def _write_private(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as JSON to ``path`` (0600), atomically (a temporary file, then a rename); not at all on an error."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump(value, out)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
