"""Storage URLs: the databases a study may live in, the default one under trials/, the SQLite
file a URL names, and URLs (and drivers' errors) printed without their secrets."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from autotune.errors import UsageError

TRIALS_DIR = Path("trials")
"""Where a run keeps its files: the default storage, the token cache, probe files, artifacts."""
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
"""The databases a study can live in (a URL's scheme, before any +driver)."""
DEFAULT_STORAGE = f"sqlite:///{TRIALS_DIR}/autotune.db"


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key")
"""Query parameters of a storage URL that are masked like its password (any key containing one)."""
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&][^=&#]*(?:" + "|".join(SECRET_QUERY_KEYS) + r")[^=&#]*=)(?P<value>[^&#]*)",
    re.IGNORECASE,
)


def _url_secrets(url: str) -> list[str]:
    """The password and the secret query values of a storage URL, as written and decoded, and
    each '@'-separated piece of the password: a driver that ends the password at its first '@'
    prints the rest as part of the host."""
    from urllib.parse import unquote, unquote_plus

    secrets = []
    match = _USERINFO.match(url)
    if match and ":" in match["userinfo"]:
        password = match["userinfo"].split(":", 1)[1]
        secrets += [password, *(p for p in password.split("@") if len(p) > 1)]
    secrets += [m["value"] for m in _QUERY_SECRET.finditer(unquote(url))]
    secrets += [m["value"] for m in _QUERY_SECRET.finditer(url)]
    secrets += [unquote(s) for s in secrets] + [unquote_plus(s) for s in secrets]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """A storage URL with its password and secret query parameters replaced by ***, safe for
    output, logs and reports. The user part ends at the *last* '@': a password holding an
    unescaped '@' is masked whole (SQLAlchemy's parser would end it at the first '@' and print
    the rest as the host), and an empty user keeps its password masked too."""
    match = _USERINFO.match(url)
    if match and ":" in match["userinfo"]:
        user = match["userinfo"].split(":", 1)[0]
        url = f"{match['scheme']}{user}:***@" + url[match.end() :]
    url = _QUERY_SECRET.sub(lambda m: m["key"] + "***", url)
    # a key written percent-encoded (?pass%77ord=) is a secret key too
    return re.sub(
        r"([?&])([^=&#]*%[^=&#]*)=([^&#]*)",
        lambda m: f"{m[1]}{m[2]}=***" if _QUERY_SECRET.match(f"?{unquote(m[2])}=") else m[0],
        url,
    )


def without_secrets(text: str, url: str) -> str:
    """`text` (a driver's error, say) with every secret of the storage URL `url` masked, and
    any user part left in it (word@host) too."""
    for secret in _url_secrets(url):
        text = text.replace(secret, "***")
    return re.sub(r"[^\s'\"@]+@", "***@", text)


def check_storage_url(url: str) -> None:
    """Refuse, in one line, a --storage that is no database URL autotune keeps studies in: a
    file's path, another kind of URL, or a SQLite database in memory (lost at the end)."""
    if "://" not in url:  # a file's path: say how to name it, not SQLAlchemy's parse error
        raise UsageError(
            f"--storage {url} is not a database URL; for a SQLite file write sqlite:///{url}"
        )
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:  # SQLAlchemy's words: "Can't load plugin: ...journal"
        also = "; write postgresql://" if scheme == "postgres" else ""
        raise UsageError(
            f"--storage {redact_url(url)}: autotune keeps studies in sqlite:///PATH, "
            f"postgresql://USER:PASSWORD@HOST/DATABASE or mysql://...{also}"
        )
    database = url.split("://", 1)[1].lstrip("/").split("?")[0]
    if scheme == "sqlite" and database in ("", ":memory:"):
        raise UsageError(
            f"--storage {url} names no file, so its SQLite database would live in memory and "
            "be lost when the command ends; write sqlite:///PATH"
        )
    path = sqlite_file(url)
    if path is not None and path.parts[:1] == ("~",):
        raise UsageError(
            f"--storage {url}: SQLite does not expand ~ (it would open a folder named ~ here); "
            f"write the path out, sqlite:///{path.expanduser()}"
        )


SQLITE_URL = re.compile(r"sqlite(\+\w+)?:///(?P<database>[^?]*)")
"""A SQLite storage URL, its driver named or not, and its file as SQLAlchemy reads it."""


def sqlite_file(url: str | None) -> Path | None:
    """The file of a sqlite:/// (or sqlite+DRIVER:///) storage URL (the default one for
    None), percent-escapes decoded as SQLAlchemy decodes them; None for a server."""
    match = SQLITE_URL.match(url or DEFAULT_STORAGE)
    if match is None:
        return None
    return Path(unquote(match["database"]))
