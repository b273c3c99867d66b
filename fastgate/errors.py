"""Error types and the JSON error contract shared by every surface."""

from __future__ import annotations


class FastgateError(Exception):
    """Base class for fastgate's own failures."""


class ConfigError(FastgateError):
    """A configuration file (or its overrides) is invalid.

    Carries every problem found, each one located: ``FILE: $.field.path: message``.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"{self.source}: {path}: {msg}" for path, msg in self.problems)


# Error codes of the public contract (DESIGN.md "Errors are JSON") plus the few
# the HTTP layer needs that DESIGN does not list; each maps to one status.
ERROR_STATUS: dict[str, int] = {
    "bad_request": 400,
    "key_missing": 401,
    "key_invalid": 401,
    "key_expired": 401,
    "ip_denied": 403,
    "scope_denied": 403,
    "no_route": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "body_too_large": 413,
    "uri_too_long": 414,
    "rate_limited": 429,
    "headers_too_large": 431,
    "internal_error": 500,
    "upstream_unavailable": 502,
    "upstream_timeout": 504,
    "http_version_not_supported": 505,
}
