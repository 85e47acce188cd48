"""The OpenAPI 3.1 document of the serving HTTP API, served on ``/openapi.json``.

>>> doc = openapi_document()
>>> sorted(doc["paths"])[:3]
['/healthz', '/metrics', '/openapi.json']
"""

from __future__ import annotations

from memento.schemas import ACTIONS
from serving.validation import MAX_K, MAX_RECENT_ITEMS

__all__ = ["openapi_document"]

_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string", "description": "What was wrong, naming the field"}}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(max_body_bytes: int = 64 * 1024) -> dict:
    error_responses = {
        "400": _json(_ERROR, "Body is not a JSON object"),
        "413": _json(_ERROR, f"Body larger than {max_body_bytes} bytes"),
        "422": _json(_ERROR, "A field is missing, of the wrong type or out of range"),
    }
    recent_item = {"type": "object", "required": ["item_id", "action"], "properties": {
        "item_id": {"type": "string", "minLength": 1},
        "action": {"type": "string", "enum": list(ACTIONS)},
        "ts": {"type": "number", "description": "Event time (epoch s); default: the request's ts"}}}
    recommend_request = {"type": "object", "required": ["user_id"], "properties": {
        "user_id": {"type": "string", "minLength": 1},
        "ts": {"type": "number", "description": "Event time (epoch s); default: now"},
        "context": {"type": "object", "properties": {
            "recent_items": {"type": "array", "maxItems": MAX_RECENT_ITEMS, "items": recent_item}}},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 1},
        "explain": {"type": "boolean", "default": False}}}
    candidate = {"type": "object", "properties": {
        "case_id": {"type": "string"}, "item_id": {"type": "string"}, "probability": {"type": "number"},
        "q": {"type": "number"}, "similarity": {"type": "number"}}}
    recommend_response = {"type": "object", "required": [
        "request_id", "user_id", "item_id", "items", "case_id", "propensity", "policy_version", "ts"],
        "properties": {
            "request_id": {"type": "string"}, "user_id": {"type": "string"},
            "item_id": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}},
            "case_id": {"type": "string"},
            "propensity": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                           "description": "mu(c|s) of the chosen case"},
            "policy_version": {"type": "integer"}, "ts": {"type": "number"},
            "candidates": {"type": "array", "items": candidate, "description": "Only when explain"}}}
    feedback_request = {"type": "object", "required": ["user_id", "item_id", "action"], "properties": {
        "user_id": {"type": "string"}, "item_id": {"type": "string"},
        "action": {"type": "string", "enum": list(ACTIONS)}, "ts": {"type": "number"},
        "request_id": {"type": "string"}, "event_id": {"type": "string"}}}
    ready = {"type": "object", "properties": {"ready": {"type": "boolean"},
                                              "policy_version": {"type": ["integer", "null"]},
                                              "cases": {"type": "integer"}}}
    stats = {"type": "object", "properties": {k: {"type": "integer"} for k in (
        "policy_version", "cases", "cases_appended", "reloads", "reload_failures", "requests")}}
    auth = {"401": _json(_ERROR, "Token required"), "403": _json(_ERROR, "Invalid token, or one without the scope")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "memento-stream serving", "version": "1",
                 "description": "Case retrieval by a soft-Q policy; recommendations and feedback are "
                                "published to Kafka."},
        "components": {"securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "A token whose scopes (serving.auth: recommend, feedback, cases, admin) include the "
                           "operation's; an operation whose scope no configured token holds is open"}}},
        "paths": {
            "/v1/recommend": {"post": {
                "summary": "Recommend item(s) for a user",
                "security": [{"bearer": ["recommend"]}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": recommend_request}}},
                "responses": {"200": _json(recommend_response, "The recommendation"), **error_responses, **auth,
                              "503": _json(_ERROR, "No policy loaded or empty case bank")}}},
            "/v1/feedback": {"post": {
                "summary": "Report a user's action (published to the actions topic)",
                "security": [{"bearer": ["feedback"]}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": feedback_request}}},
                "responses": {"202": {"description": "Accepted for publishing"}, **error_responses, **auth}}},
            "/v1/cases/{case_id}": {"get": {
                "summary": "One case of the serving case bank",
                "security": [{"bearer": ["cases"]}],
                "parameters": [{"name": "case_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The case"}, "404": _json(_ERROR, "Unknown case"), **auth}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: a policy is loaded and the bank has a case",
                                "responses": {"200": _json(ready, "Ready"), "503": _json(ready, "Not ready")}}},
            "/v1/stats": {"get": {"summary": "Counters", "security": [{"bearer": ["admin"]}],
                                  "responses": {"200": _json(stats, "Counters"), **auth}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (here unless serving has a metrics port of its own)",
                                 "responses": {"200": {"description": "Prometheus text format"}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }
