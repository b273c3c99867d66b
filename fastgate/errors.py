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


# Every error code of the public contract (DESIGN.md "Errors are JSON" and its
# Wave 2 additions): code -> (HTTP status, the pipeline stage that answers with
# it). Local replies, the access log's ``decision``, metrics labels and the
# admin API all read this one table.
ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "parse"),
    "upgrade_refused": (400, "parse"),
    "key_missing": (401, "key"),
    "key_invalid": (401, "key"),
    "key_expired": (401, "key"),
    "ip_denied": (403, "ip"),
    "scope_denied": (403, "scope"),
    "key_suspended": (403, "key"),
    "no_route": (404, "route"),
    "method_not_allowed": (405, "route"),
    "request_timeout": (408, "parse"),
    "body_too_large": (413, "limits"),
    "uri_too_long": (414, "parse"),
    "rate_limited": (429, "rate"),
    "credits_exhausted": (429, "rate"),
    "headers_too_large": (431, "parse"),
    "internal_error": (500, "internal"),
    "upstream_unavailable": (502, "upstream"),
    "upstream_cut": (502, "upstream"),
    "overloaded": (503, "upstream"),
    "store_unavailable": (503, "store"),
    "upstream_timeout": (504, "upstream"),
    "http_version_not_supported": (505, "parse"),
    # never sent: how the access log and metrics name an exchange whose client
    # went away before its answer (nginx's 499)
    "client_closed": (499, "client"),
    # The admin API's own answers (its port, not the proxy pipeline).
    "unauthorized": (401, "admin"),
    "not_found": (404, "admin"),
    "conflict": (409, "admin"),
    "key_table_full": (503, "admin"),
}
ERROR_STATUS: dict[str, int] = {code: status for code, (status, _) in ERRORS.items()}
STAGE_OF: dict[str, str] = {code: stage for code, (_, stage) in ERRORS.items()}
