"""Users of an Apache htpasswd file (bcrypt entries only): checked off the event loop, reloaded on change.

An entry Wharf cannot verify (another hash scheme) or that matches the empty password stops
start-up with a message naming it; at a reload the previous users stay and the log says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Executor

import bcrypt

log = logging.getLogger("wharf.auth")

# Distribution reads bcrypt entries only; Apache's `htpasswd -B` writes $2y$.
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
DEFAULT_COST = 10  # Go's bcrypt.DefaultCost, which Distribution's examples use
MAX_PASSWORD_BYTES = 72  # bcrypt ignores (Go refuses) anything longer
# A verified password is remembered this long, so a client's every request does not pay ~100 ms.
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 10_000
# How often the file's identity (inode, mtime, size) is looked at for a reload.
RELOAD_SECONDS = 1.0

# Apache's other schemes, named in the message that refuses them.
_OTHER_SCHEMES = (
    ("$apr1$", "Apache MD5 ($apr1$)"),
    ("{SHA}", "unsalted SHA-1 ({SHA})"),
    ("$1$", "MD5-crypt ($1$)"),
    ("$5$", "SHA-256-crypt ($5$)"),
    ("$6$", "SHA-512-crypt ($6$)"),
)
_USER = re.compile(r"[^:\s\x00-\x1f\x7f]{1,256}")


class HtpasswdError(ValueError):
    pass


def validate_user(user: str) -> str:
    if not _USER.fullmatch(user):
        raise HtpasswdError(f"invalid user name {user[:50]!r}: no colon, space or control character, 1-256 long")
    return user


def _entries(text: str, source: str) -> Iterator[tuple[int, str, bytes | None, str | None]]:
    """(line number, user, bcrypt hash or None, why the entry is unusable or None) of each entry."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            yield number, user, None, f"htpasswd file {source} line {number} is not user:hash"
        elif not hashed.startswith(BCRYPT_PREFIXES):
            scheme = next((name for prefix, name in _OTHER_SCHEMES if hashed.startswith(prefix)), "not a bcrypt hash")
            yield (
                number,
                user,
                None,
                f"htpasswd file {source} line {number}: user {user}'s password is {scheme}, which Wharf does not "
                f"verify (bcrypt only, as Distribution); set it again with `wharf htpasswd add {source} {user}` "
                "or `htpasswd -B`",
            )
        else:
            yield number, user, hashed.encode(), None


def parse(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """user -> bcrypt hash; comments, blank lines and unusable entries are skipped (with a warning)."""
    users: dict[str, bytes] = {}
    for _, user, hashed, problem in _entries(text, source):
        if hashed is None:
            log.warning("%s; skipped", problem)
        else:
            users[user] = hashed
    return users


def load(
    text: str, source: str, *, checked: set[bytes] | None = None, executor: Executor | None = None
) -> dict[str, bytes]:
    """user -> bcrypt hash, or HtpasswdError naming the first entry nobody could use safely.

    Refused: an entry that is not user:hash, a hash in another scheme, a malformed bcrypt hash, and
    one that matches the empty password. The last costs one bcrypt check per entry; hashes in
    `checked` passed before and are not checked again (it gains the ones that pass now).
    """
    users: dict[str, bytes] = {}
    lines: dict[str, int] = {}
    for number, user, hashed, problem in _entries(text, source):
        if hashed is None:
            raise HtpasswdError(problem)
        users[user] = hashed
        lines[user] = number
    known = checked if checked is not None else set()
    pending = [(user, hashed) for user, hashed in users.items() if hashed not in known]
    run = executor.map if executor is not None else map
    for (user, hashed), verdict in zip(pending, run(_empty_or_broken, [h for _, h in pending]), strict=True):
        if verdict is not None:
            raise HtpasswdError(
                f"htpasswd file {source} line {lines[user]}: user {user} {verdict}; "
                f"set a password with `wharf htpasswd add {source} {user}`"
            )
        known.add(hashed)
    return users


def _empty_or_broken(hashed: bytes) -> str | None:
    """Why a bcrypt entry cannot stay: it matches the empty password, or is malformed; None if fine."""
    try:
        if bcrypt.checkpw(b"", hashed):
            return "has an empty password"
    except ValueError:
        return "has a malformed bcrypt hash"
    return None


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    data = password.encode()
    if not data:
        raise HtpasswdError("the password is empty")
    if len(data) > MAX_PASSWORD_BYTES:
        raise HtpasswdError(f"bcrypt passwords are at most {MAX_PASSWORD_BYTES} bytes")
    return bcrypt.hashpw(data, bcrypt.gensalt(cost)).decode()


def _check(password: bytes, hashed: bytes) -> bool:
    if len(password) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a malformed hash in the file
        return False


def _cost(hashed: bytes) -> int:
    try:
        return int(hashed.split(b"$")[2])
    except (IndexError, ValueError):
        return DEFAULT_COST


# -- editing the file (`wharf htpasswd`) -------------------------------------------------------


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        return []


def _write_lines(path: str, lines: list[str]) -> None:
    """Replace the file in one rename, so a registry reloading it never sees half of it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, temp = tempfile.mkstemp(prefix=".htpasswd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _is_entry_of(line: str, user: str) -> bool:
    return not line.lstrip().startswith("#") and line.strip().partition(":")[0] == user


def set_password(path: str, user: str, password: str, cost: int = DEFAULT_COST) -> bool:
    """Add `user` or change its password; True when the user is new. Other lines are kept."""
    validate_user(user)
    entry = f"{user}:{hash_password(password, cost)}"
    lines = _read_lines(path)
    kept = [line for line in lines if not _is_entry_of(line, user)]
    _write_lines(path, kept + [entry])
    return len(kept) == len(lines)


def remove_user(path: str, user: str) -> bool:
    """False when the file has no such user."""
    lines = _read_lines(path)
    kept = [line for line in lines if not _is_entry_of(line, user)]
    if len(kept) == len(lines):
        return False
    _write_lines(path, kept)
    return True


def list_users(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return list(parse(handle.read(), path))


# -- checking passwords in the registry --------------------------------------------------------


class HtpasswdFile:
    """The users of one htpasswd file, for request handlers: `verify` never blocks the event loop.

    bcrypt runs in the given executor (a small pool), at most `max_pending` checks queue for it, and
    concurrent checks of the same credentials share one computation. A successful check is cached
    for CACHE_SECONDS under an HMAC (with a per-process key) of user, password and stored hash, so
    the plain password is never kept and a changed or removed entry stops matching at once.
    """

    def __init__(
        self, path: str, executor: Executor, *, max_pending: int = 64, key: str = "auth.htpasswd.path"
    ) -> None:
        self.path = path
        self._executor = executor
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._dummy = b""
        self._secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[bool]] = {}
        self._slots = asyncio.Semaphore(max_pending)
        self._usable: set[bytes] = set()  # hashes known not to match the empty password
        self._loaded = False
        if os.path.isdir(path):
            raise HtpasswdError(
                f"{key}: expected an htpasswd file, got the directory {path!r} "
                f"(create a file with `wharf htpasswd add {path.rstrip('/')}/htpasswd USER` and name it)"
            )
        if not os.path.isfile(path):
            raise HtpasswdError(
                f"{key}: expected an htpasswd file, got {path!r}, which does not exist "
                f"(create it with `wharf htpasswd add {path} USER`)"
            )
        self._refresh(executor)  # at start, the entries are checked in parallel
        self._checked = time.monotonic()

    def __contains__(self, user: str) -> bool:
        return user in self._users

    def __len__(self) -> int:
        return len(self._users)

    def _refresh(self, executor: Executor | None = None) -> None:
        """Re-read the file if it changed; keep the last good users if it cannot be read or used.

        At start (no users yet) an unusable file raises HtpasswdError instead.
        """
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                users = load(handle.read(), self.path, checked=self._usable, executor=executor)
        except OSError as exc:
            if self._stamp is not None:
                log.warning("htpasswd file %s cannot be read (%s); keeping %d users", self.path, exc, len(self._users))
                self._stamp = None
            return
        except HtpasswdError as exc:
            if not self._loaded:
                raise
            log.error("%s; the file is not reloaded: keeping its previous %d users", exc, len(self._users))
            self._stamp = stamp  # said once per change of the file
            return
        costs = sorted(_cost(h) for h in users.values())
        cost = costs[len(costs) // 2] if costs else DEFAULT_COST
        if not self._dummy or _cost(self._dummy) != cost:
            # Checked for unknown users, so a wrong name costs as long as a wrong password.
            self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        if self._loaded:
            log.info("htpasswd file %s reloaded: %d users", self.path, len(users))
        self._users = users
        self._stamp = stamp
        self._loaded = True

    async def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_SECONDS:
            return
        self._checked = now
        await asyncio.get_running_loop().run_in_executor(self._executor, self._refresh)

    async def stored_hash(self, user: str) -> bytes | None:
        """The user's current password hash (the file re-read if it changed), or None for no such user."""
        await self._maybe_refresh()
        return self._users.get(user)

    async def verify(self, user: str, password: bytes) -> bool:
        await self._maybe_refresh()
        hashed = self._users.get(user)
        key = hmac.new(self._secret, b"\0".join((user.encode(), password, hashed or b"")), hashlib.sha256).digest()
        now = time.monotonic()
        expires = self._cache.get(key)
        if hashed is not None and expires is not None:
            if expires > now:
                return True
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._check(password, hashed or self._dummy))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # Shielded: a caller that goes away does not cancel the check others wait for.
        ok = await asyncio.shield(task) and hashed is not None
        if ok:
            self._cache[key] = time.monotonic() + CACHE_SECONDS
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return ok

    async def _check(self, password: bytes, hashed: bytes) -> bool:
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._executor, _check, password, hashed)
