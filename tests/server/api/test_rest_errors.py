"""REST errors the web framework raises before a route runs are answered in our form, and the OpenAPI
document describes that form for every operation."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api.app import rest_app
from server.context import ServiceContext, ServiceRef
from server.store import agents


def _client(service: ServiceContext) -> TestClient:
    _, key = agents.create_agent(service.engine, service.settings, "rest-errors")
    return TestClient(rest_app(ServiceRef(service)), headers={"Authorization": f"Bearer {key}"})


def test_a_path_no_route_matches_answers_not_found_in_our_form(service: ServiceContext) -> None:
    with _client(service) as client:
        response = client.get("/v1/no-such-thing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found" and "/openapi.json" in response.json()["error"]["message"]


def test_a_body_that_is_not_utf8_json_answers_invalid_request_naming_the_body(service: ServiceContext) -> None:
    with _client(service) as client:
        response = client.post("/v1/trainings", content=b"\xcfU\x95\xab\x0f",
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": {"code": "invalid_request", "param": "body", "message": (
        "the body could not be read (it is not UTF-8 JSON); send a JSON object")}}


def test_a_method_the_route_does_not_take_answers_405_in_our_form_with_allow(service: ServiceContext) -> None:
    with _client(service) as client:
        response = client.delete("/v1/quota")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["code"] == "invalid_request"


def test_the_openapi_document_gives_every_operation_our_error_form(service: ServiceContext) -> None:
    with _client(service) as client:
        document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status in ("401", "404", "409", "422", "429"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]
