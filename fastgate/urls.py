"""Service URLs of cluster mode (``[cluster] store`` and ``redis``): checked, and shown
without their password. Used by the config (check-config) and by the stores, so both
say the same thing about the same URL."""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qs, urlsplit

PG_SCHEMES = ("postgresql", "postgres")  # libpq reads both
REDIS_SCHEMES = ("redis", "rediss")
PG_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
REDIS_FORM = "redis://[USER:PASSWORD@]HOST[:PORT][/DB] (or rediss:// for TLS)"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return SplitResult(parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment).geturl()


def is_pg_url(value: str) -> bool:
    return isinstance(value, str) and value.split(":", 1)[0].lower() in PG_SCHEMES and "://" in value


def _split(value: str, schemes: tuple[str, ...], form: str) -> SplitResult:
    if not isinstance(value, str):
        raise ValueError(f"expected a URL {form}, found {type(value).__name__}")
    shown = redact(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port that is not 0-65535)
    except ValueError as exc:
        raise ValueError(f"expected a URL {form}, found {shown!r} ({exc})") from None
    if parts.scheme.lower() not in schemes or not value.lower().startswith(f"{parts.scheme.lower()}://"):
        raise ValueError(f"expected a URL {form}, found {shown!r} (the scheme must be "
                         f"{' or '.join(s + '://' for s in schemes)})")
    if any(c.isspace() for c in value):
        raise ValueError(f"expected a URL {form} without spaces, found {shown!r}")
    return parts


def check_pg_url(value: str) -> str:
    """ValueError unless ``value`` is a PostgreSQL connection URL naming a host and a database."""
    parts = _split(value, PG_SCHEMES, PG_FORM)
    query = parse_qs(parts.query)
    if not parts.hostname and not query.get("host"):
        raise ValueError(f"expected a URL {PG_FORM} with a host, found {redact(value)!r}")
    if not parts.path.strip("/") and not query.get("dbname"):
        raise ValueError(f"expected a URL {PG_FORM} with a database name, found {redact(value)!r}")
    return value


def check_redis_url(value: str) -> str:
    """ValueError unless ``value`` is a redis:// or rediss:// URL with a host (and a numeric DB, if any)."""
    parts = _split(value, REDIS_SCHEMES, REDIS_FORM)
    if not parts.hostname:
        raise ValueError(f"expected a URL {REDIS_FORM} with a host, found {redact(value)!r}")
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"expected a URL {REDIS_FORM} whose path is a database number, found {redact(value)!r}")
    return value
