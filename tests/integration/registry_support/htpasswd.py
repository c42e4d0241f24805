"""htpasswd files for the registry's Basic auth (distribution accepts bcrypt hashes only)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Mapping
from pathlib import Path


def bcrypt_hash(password: str) -> str:
    """A ``$2b$`` bcrypt hash from the system's libcrypt (libxcrypt), so no extra package."""
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    lib = ctypes.CDLL(name)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    if not salt:
        raise RuntimeError("libcrypt cannot make bcrypt salts")
    hashed = lib.crypt(password.encode(), salt)
    if not hashed or not hashed.startswith(b"$2b$"):
        raise RuntimeError("libcrypt did not produce a bcrypt hash")
    return str(hashed.decode())


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items()))
    return path
