"""GET /openapi.json, derived from the same msgspec Structs that decode the
bodies (msgspec.json.schema_components), so it cannot drift from the API."""

from __future__ import annotations

import functools

import msgspec

from .._version import __version__
from .schemas import AuditList, CreateKey, Error, KeyCreated, KeyList, KeyOut, RotateKey, UpdateKey


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _resp(code: int, name: str | None, desc: str) -> dict:
    r = {"description": desc}
    if name:
        r.update(_json(name))
    return {str(code): r}


@functools.lru_cache(maxsize=1)
def document() -> dict:
    (_, components) = msgspec.json.schema_components(
        [CreateKey, UpdateKey, RotateKey, KeyOut, KeyCreated, KeyList, AuditList, Error],
        ref_template="#/components/schemas/{name}",
    )
    err = {
        **_resp(400, "Error", "invalid body or parameter; the message names the field path"),
        **_resp(401, "Error", "missing or wrong admin token"),
    }
    key_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    not_found = _resp(404, "Error", "no such key")
    paths = {
        "/keys": {
            "post": {
                "summary": "Create a key; the secret is in the reply, once",
                "requestBody": {"required": True, **_json("CreateKey")},
                "responses": {**_resp(201, "KeyCreated", "created (durable)"), **err,
                              **_resp(503, "Error", "key table full")},
            },
            "get": {
                "summary": "List keys",
                "parameters": [
                    {"name": "owner", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {**_resp(200, "KeyList", "a page of keys"), **err},
            },
        },
        "/keys/{id}": {
            "parameters": [key_id],
            "get": {"summary": "Show a key", "responses": {**_resp(200, "KeyOut", "the key"), **err, **not_found}},
            "patch": {
                "summary": "Change fields of a key; effective on the next request",
                "requestBody": {"required": True, **_json("UpdateKey")},
                "responses": {**_resp(200, "KeyOut", "updated"), **err, **not_found},
            },
            "delete": {"summary": "Delete a key", "responses": {**_resp(204, None, "deleted"), **err, **not_found}},
        },
        "/keys/{id}/rotate": {
            "parameters": [key_id],
            "post": {
                "summary": "New secret; the old one works until grace_seconds pass",
                "requestBody": {"required": False, **_json("RotateKey")},
                "responses": {**_resp(200, "KeyCreated", "rotated"), **err, **not_found,
                              **_resp(409, "Error", "key is revoked")},
            },
        },
        "/keys/{id}/revoke": {
            "parameters": [key_id],
            "post": {"summary": "Revoke; refused by every worker before this answers",
                     "responses": {**_resp(200, "KeyOut", "revoked"), **err, **not_found}},
        },
        "/audit": {
            "get": {
                "summary": "Key lifecycle events (hash-chained)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "key_id", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {**_resp(200, "AuditList", "events in order"), **err},
            },
        },
        "/reload": {
            "post": {"summary": "Validate the config file, then reload it (as SIGHUP)",
                     "responses": {"202": {"description": "reload requested"}, **err,
                                   **_resp(409, "Error", "no config file")}},
        },
        "/healthz": {"get": {"summary": "Liveness (no token needed)", "security": [],
                             "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness: 503 while draining (no token needed)", "security": [],
                            "responses": {"200": {"description": "ready"}, "503": {"description": "draining"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastgate admin API", "version": __version__},
        "components": {
            "schemas": components,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"admin": []}],
        "paths": paths,
    }
