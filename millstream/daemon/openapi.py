"""The OpenAPI 3.1 document the daemon serves at ``/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_RUN_PATH = [
    {
        "name": "flow",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
    },
    {
        "name": "run_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"},
    },
]


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "millstream daemon", "version": "1"},
    "paths": {
        "/v1/health": {
            "get": {"summary": "Liveness", "responses": {"200": {"description": "ok", "content": _json("Health")}}}
        },
        "/v1/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "the document"}}}
        },
        "/v1/packages/{sha}": {
            "parameters": [
                {
                    "name": "sha",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                }
            ],
            "head": {
                "summary": "Is the code package stored?",
                "responses": {"200": {"description": "stored"}, "404": {"description": "absent"}},
            },
            "put": {
                "summary": "Store a code package (tar.gz) under its sha256",
                "requestBody": {
                    "required": True,
                    "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": {"201": {"description": "stored"}, "400": _ERROR, "413": _ERROR},
            },
        },
        "/v1/runs": {
            "post": {
                "summary": "Submit a run",
                "requestBody": {"required": True, "content": _json("Submission")},
                "responses": {
                    "201": {"description": "accepted", "content": _json("Submitted")},
                    "400": _ERROR,
                    "409": _ERROR,
                    "413": _ERROR,
                    "415": _ERROR,
                    "503": _ERROR,
                },
            },
            "get": {
                "summary": "List runs, newest first",
                "parameters": [
                    {"name": "flow", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["running", "ok", "failed", "cancelled"]},
                    },
                    {"name": "owner", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "a page of runs", "content": _json("RunPage")}, "400": _ERROR},
            },
        },
        "/v1/runs/{flow}/{run_id}": {
            "parameters": _RUN_PATH,
            "get": {
                "summary": "A run with per-step counts and every task's attempts",
                "responses": {
                    "200": {"description": "the run", "content": _json("RunDetail")},
                    "400": _ERROR,
                    "404": _ERROR,
                },
            },
        },
        "/v1/runs/{flow}/{run_id}/events": {
            "parameters": _RUN_PATH,
            "get": {
                "summary": "The run's events as NDJSON",
                "parameters": [
                    {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
                ],
                "responses": {
                    "200": {"description": "NDJSON events", "content": {"application/x-ndjson": {}}},
                    "400": _ERROR,
                    "404": _ERROR,
                },
            },
        },
        "/v1/runs/{flow}/{run_id}/logs/{step}/{task_id}": {
            "parameters": [
                *_RUN_PATH,
                {"name": "step", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "get": {
                "summary": "A task attempt's output",
                "parameters": [
                    {"name": "stream", "in": "query", "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
                    {"name": "attempt", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
                ],
                "responses": {
                    "200": {"description": "bytes", "content": {"text/plain": {}}},
                    "400": _ERROR,
                    "404": _ERROR,
                },
            },
        },
        "/v1/runs/{flow}/{run_id}/cancel": {
            "parameters": _RUN_PATH,
            "post": {
                "summary": "Cancel a run (its owner or an admin only)",
                "responses": {"202": {"description": "cancelling"}, "403": _ERROR, "404": _ERROR, "409": _ERROR},
            },
        },
        "/v1/runs/{flow}/{run_id}/tags": {
            "parameters": _RUN_PATH,
            "post": {
                "summary": "Remove, then add, user tags of a run (its owner or an admin only)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "add": {"type": "array", "items": {"type": "string", "minLength": 1}},
                                    "remove": {"type": "array", "items": {"type": "string", "minLength": 1}},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {"description": "the run with its tags", "content": _json("RunSummary")},
                    "400": _ERROR,
                    "403": _ERROR,
                    "404": _ERROR,
                    "415": _ERROR,
                },
            },
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        "/v1/schedules": {
            "get": {"summary": "Every schedule", "responses": {"200": {"description": "schedules"}}},
            "post": {
                "summary": "Save a schedule",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["submission"],
                                "properties": {
                                    "submission": {"$ref": "#/components/schemas/Submission"},
                                    "name": {"type": "string"},
                                    "cron": {"type": "string"},
                                    "timezone": {"type": "string"},
                                    "catchup": {"type": "string", "enum": ["latest", "all", "none"]},
                                    "triggers": {"type": "array", "items": {"type": "string"}},
                                },
                            }
                        }
                    },
                },
                "responses": {"201": {"description": "saved"}, "400": _ERROR, "403": _ERROR, "409": _ERROR},
            },
        },
        "/v1/schedules/{name}/{action}": {
            "parameters": [
                _NAME,
                {
                    "name": "action",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["pause", "resume"]},
                },
            ],
            "post": {"summary": "Pause or resume", "responses": {"200": {"description": "ok"}, "404": _ERROR}},
        },
        "/v1/schedules/{name}": {
            "parameters": [_NAME],
            "delete": {"summary": "Forget a schedule", "responses": {"200": {"description": "ok"}, "404": _ERROR}},
        },
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "Health": {
                "type": "object",
                "properties": {
                    "status": {"type": "string"},
                    "version": {"type": "string"},
                    "pid": {"type": "integer"},
                    "active_runs": {"type": "integer"},
                },
            },
            "Submission": {
                "type": "object",
                "required": ["flow", "graph", "package", "module_file", "class_name"],
                "properties": {
                    "flow": {"type": "string"},
                    "graph": {"type": "object"},
                    "params": {"type": "object"},
                    "package": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "module_file": {"type": "string"},
                    "class_name": {"type": "string"},
                    "python": {"type": "string"},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "options": {
                        "type": "object",
                        "properties": {
                            "max_workers": {"type": "integer", "minimum": 1},
                            "max_num_splits": {"type": "integer", "minimum": 1},
                            "tags": {"type": "array", "items": {"type": "string"}},
                            "with": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
            },
            "Submitted": {
                "type": "object",
                "properties": {
                    "flow": {"type": "string"},
                    "run_id": {"type": "string"},
                    "pathspec": {"type": "string"},
                    "owner": {"type": "string"},
                },
            },
            "RunSummary": {
                "type": "object",
                "properties": {
                    "flow": {"type": "string"},
                    "run_id": {"type": "string"},
                    "status": {"type": "string"},
                    "owner": {"type": "string"},
                    "created_at": {"type": "number"},
                    "finished_at": {"type": ["number", "null"]},
                    "message": {"type": ["string", "null"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
            },
            "RunPage": {
                "type": "object",
                "properties": {
                    "runs": {"type": "array", "items": {"$ref": "#/components/schemas/RunSummary"}},
                    "next_cursor": {"type": ["string", "null"]},
                },
            },
            "RunDetail": {
                "allOf": [
                    {"$ref": "#/components/schemas/RunSummary"},
                    {
                        "type": "object",
                        "properties": {
                            "steps": {"type": "object"},
                            "tasks": {"type": "array"},
                            "params": {"type": "object"},
                        },
                    },
                ]
            },
        }
    },
}
