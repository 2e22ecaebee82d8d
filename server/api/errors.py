"""The one mapping from what went wrong to what a caller reads, for every transport.

Any invalid call (a pydantic ValidationError from a tool's request model, FastAPI's
RequestValidationError from a REST route) becomes `invalid_request` listing every problem with its
field; our own errors keep their code. REST answers `{"error": {code, message, param, problems?}}`
with the error's status; MCP a tool error whose text starts with the code (its structure too); the
OpenAI-compatible endpoint OpenAI's `{"error": {message, type, param, code}}`. Anything else is a
bug: it is logged with its traceback and the caller gets `internal_error` without details.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from server.errors import InvalidRequest, NotFound, WeightsmithError, invalid_request, problems_from

log = logging.getLogger("weightsmith.api")


class InternalError(WeightsmithError):
    code = "internal_error"
    http_status = 500


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # the details some errors add: problems, limit, ...

    code: str = Field(description="invalid_request, invalid_dataset, not_found, conflict, limit_exceeded, "
                      "unauthorized, or internal_error (a bug, logged).")
    message: str = Field(description="What went wrong and what to change.")
    param: str | None = Field(description="The field to change, where one is at fault.")


class ErrorBody(BaseModel):
    """Every REST error: `{"error": {"code", "message", "param"}}`."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (401, "unauthorized: no key, or an unknown or revoked one"),
        (404, "not_found: no such object of yours, or no such route"),
        (409, "conflict: the object's state does not allow it"),
        (422, "invalid_request or invalid_dataset: what to change, naming the field"),
        (429, "limit_exceeded: which limit, and what would fit"))}
"""What the OpenAPI document says each operation may answer besides its result."""
ERROR_RESPONSES_BESIDE_HTML = {
    status: {"description": response["description"],
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for status, response in ERROR_RESPONSES.items()}
"""The same for a route whose result is HTML (FastAPI would give its errors the result's media type)."""


def as_weightsmith(err: Exception) -> WeightsmithError:
    if isinstance(err, WeightsmithError):
        return err
    if isinstance(err, ValidationError):
        return invalid_request(err)
    if isinstance(err, RequestValidationError):
        # FastAPI says where a value came from first (body, query, path): the field's name is what matters.
        errors = [{**e, "loc": tuple(e["loc"][1:]) or ("body",)} for e in err.errors()]
        return InvalidRequest.of(problems_from(errors) or [("", "the request is not valid")])
    if isinstance(err, HTTPException):
        return _from_http(err)
    log.error("internal error", exc_info=err)
    return InternalError("the service failed on this request; it is logged. Try again, and report it if it "
                         "persists")


def _from_http(err: HTTPException) -> WeightsmithError:
    """What the web framework refuses before a route runs: a path no route matches, a body that cannot
    be read, a method the route does not take."""
    if err.status_code == 404:
        return NotFound("no route has this path; the routes are listed at /docs and /openapi.json")
    if err.status_code == 400:
        return InvalidRequest("the body could not be read (it is not UTF-8 JSON); send a JSON object", param="body")
    refused = InvalidRequest("this route does not take this HTTP method; /openapi.json lists each route's method"
                             if err.status_code == 405 else f"the request was refused: {err.detail}")
    refused.http_status = err.status_code
    return refused


def rest_body(err: WeightsmithError) -> dict[str, Any]:
    return {"error": err.to_dict()}


def openai_body(err: WeightsmithError) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            500: "server_error"}.get(err.http_status, "invalid_request_error")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
