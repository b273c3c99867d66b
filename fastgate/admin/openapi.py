"""GET /openapi.json, derived from the admin API's route table and the msgspec
Structs that decode its bodies (msgspec.json.schema_components), so it cannot
drift from the API: the server routes, answers 405, and validates bodies and
query parameters from the same declarations this module renders.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .._version import __version__
from .schemas import Error, KeyId

TEXT = "text"  # an operation whose 200 is Prometheus text, not JSON
ANY_JSON = "json"  # an operation whose 200 is a JSON object with no Struct (the document itself)
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Param:
    """A query parameter: ``type`` (an Annotated type) is both its schema and its validation."""

    name: str
    type: Any
    description: str = ""
    default: Any = None


@dataclass(frozen=True)
class Op:
    """One operation of the admin API (method + path template)."""

    method: str
    path: str  # "/keys/{id}"
    handler: str  # AdminApp method name
    summary: str
    status: int  # the success status
    out: Any  # the success body: a Struct type, TEXT, ANY_JSON, or None (no body)
    body: type | None = None  # the request body Struct
    body_required: bool = True
    query: tuple[Param, ...] = ()
    auth: bool = True
    writes: bool = False  # commits to the key store (its success ends a store_unavailable incident)
    store: bool = True  # reads or writes a store (answers 503 store_unavailable when it cannot)
    responses: tuple[tuple[int, Any, str], ...] = ()  # more documented answers: (status, Struct or None, why)
    path_params: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self):
        object.__setattr__(self, "path_params", tuple(re.findall(r"\{(\w+)\}", self.path)))


PATH_PARAM_TYPES = {"id": KeyId}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _integers(node: Any) -> Any:
    """A number that must be a multiple of 1 is an integer (grace_seconds accepts 3600.0, as
    JSON Schema's integer does, so it is decoded as a float)."""
    if isinstance(node, dict):
        if node.get("type") == "number" and node.get("multipleOf") == 1:
            node = {k: v for k, v in node.items() if k != "multipleOf"}
            node["type"] = "integer"
        return {k: _integers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_integers(v) for v in node]
    return node


def _schema(tp) -> dict:
    return _integers(msgspec.json.schema(tp))


def _error(desc: str) -> dict:
    return {"description": desc, **_json(_ref("Error"))}


def _operation(op: Op) -> dict:
    out: dict[str, Any] = {"summary": op.summary, "operationId": op.handler}
    params = [{"name": p, "in": "path", "required": True, "schema": _schema(PATH_PARAM_TYPES[p])}
              for p in op.path_params]
    for q in op.query:
        s = _schema(q.type)
        if q.default is not None:
            s["default"] = q.default
        params.append({"name": q.name, "in": "query", "required": False, "schema": s,
                       **({"description": q.description} if q.description else {})})
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, **_json(_ref(op.body.__name__))}
    ok: dict[str, Any] = {"description": "success"}
    if op.out is TEXT:
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif op.out is ANY_JSON:
        ok.update(_json({"type": "object"}))
    elif op.out is not None:
        ok.update(_json(_ref(op.out.__name__)))
    responses: dict[str, Any] = {str(op.status): ok}
    bad = []
    if op.body is not None:
        bad.append("invalid JSON body (the message names the field path and the limit)")
    if op.query or op.path_params:
        bad.append("invalid path or query parameter")
    if bad:
        responses["400"] = _error("; ".join(bad))
    if op.auth:
        responses["401"] = _error("missing or wrong admin token")
    if "id" in op.path_params:
        responses["404"] = _error("no key with this id")
    if op.body is not None:
        responses["413"] = _error(f"request body over {MAX_BODY} bytes")
    if op.store:
        responses["503"] = _error("store_unavailable: the key store cannot be read or written now "
                                  "(disk full, read-only, I/O error); nothing was changed")
    for status, schema, desc in op.responses:
        r: dict[str, Any] = {"description": desc}
        if schema is None and status >= 400:
            schema = Error
        if schema is not None:
            r.update(_json(_ref(schema.__name__)))
        key = str(status)
        if key in responses and "description" in responses[key]:
            responses[key] = {**responses[key], "description": responses[key]["description"] + "; " + desc}
        else:
            responses[key] = r
    out["responses"] = responses
    if not op.auth:
        out["security"] = []
    return out


def _structs(ops: tuple[Op, ...]) -> list[type]:
    seen: list[type] = [Error]
    for op in ops:
        for tp in (op.body, op.out, *(s for _, s, _ in op.responses)):
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and tp not in seen:
                seen.append(tp)
    return seen


def _plan_enum(components: dict, plans: tuple[str, ...]) -> None:
    """The plans a body may name are the config's: say so with an enum (null clears)."""
    plan = {"type": "string", "enum": list(plans)} if plans else {"not": {}}
    for name in ("CreateKey", "UpdateKey"):
        props = components.get(name, {}).get("properties", {})
        if "plan" in props:
            desc = "one of the [plans.NAME] of the gateway's config" if plans else "no plans are configured"
            props["plan"] = {"anyOf": [plan, {"type": "null"}], "description": desc}


@functools.lru_cache(maxsize=8)
def document(ops: tuple[Op, ...], plans: tuple[str, ...] = ()) -> dict:
    (_, components) = msgspec.json.schema_components(_structs(ops), ref_template="#/components/schemas/{name}")
    components = _integers(components)
    _plan_enum(components, plans)
    paths: dict[str, dict] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fastgate admin API",
            "version": __version__,
            "description": "Every error is {\"error\": {\"code\", \"message\", \"request_id\"}}; a method a path does "
                           "not declare gets 405 with Allow. Bodies are JSON, at most 1 MiB.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"admin": []}],
        "paths": paths,
    }


def pattern_of(tp) -> str | None:
    """The ``pattern`` an Annotated string type declares (extra_json_schema), if any."""
    for m in getattr(tp, "__metadata__", ()):
        extra = getattr(m, "extra_json_schema", None) or {}
        if "pattern" in extra:
            return extra["pattern"]
    return None
