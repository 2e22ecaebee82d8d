"""schemathesis against the REST API, in process (ASGI), on the seeded store.

Every operation of `/openapi.json`, with data its schema admits and data it refuses. Each generated
case is sent with the fuzzing agent's key and real ids of the store in about 60% of its id parameters,
and checked by schemathesis (no server error, documented status and content type, the response matches
its schema, refused data refused); then twice more with a mutation (`hostile.mutate` on the JSON body,
raw, NaN and Infinity included; or on the query string; or a malformed Authorization header), checked
the same way less the check on refused data. Every 4xx body must be `{"error": {"code", "message",
"param"}}` in our words. Three requests a case, each counted.

What it does not cover: cookies (none are used), and methods or paths the document does not list.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import negative_data_rejection

from server.api.app import rest_app
from server.context import ServiceRef
from tests.fuzz.hostile import HOSTILE, mutate, substitute_real
from tests.fuzz.outcomes import InternalErrors, Tally, problem_in_error_body
from tests.fuzz.store import real_values
from tests.tools.conftest import Seeded
from tools import BY_NAME

MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
CHECKS = {"checks": {
    # Refusing data the schema admits is by design here: a dataset id that does not exist, a learning rate
    # out of range, a trigger that never fires are refused naming the field.
    "positive_data_acceptance": {"enabled": False},
    "max_response_time": 30.0,
}}
BAD_AUTHORIZATION = ("bearer {key}", "{key}", "Bearer", "", "Bearer ws_0", "Basic {key}", "Bearer  {key} x")


def fuzz_rest(seeded: Seeded, tally: Tally, cases_per_operation: int, run_seed: int = 0,
              labels: list[str] | None = None, deadline: float = math.inf) -> None:
    """Sends about `cases_per_operation` generated cases (half admitted by the schema) to each operation
    (all, or those whose label, such as "POST /v1/trainings", is in `labels`), starting none after
    `deadline` (time.monotonic()); failures go to `tally`."""
    app = rest_app(ServiceRef(seeded.ctx))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(CHECKS))
    with InternalErrors().installed() as caught:
        for result in schema.get_all_operations():
            operation = result.ok()
            if labels is None or operation.label in labels:
                # Path parameters admit any string: an operation with nothing else has no refused data
                # (hypothesis would spend seconds finding that out).
                for mode in MODES if len(operation.query) or len(operation.body) else MODES[:1]:
                    if time.monotonic() > deadline:
                        return
                    _fuzz_operation(operation, mode, seeded, tally, caught, max(1, cases_per_operation // 2),
                                    run_seed)


def _fuzz_operation(operation: schemathesis.APIOperation, mode: GenerationMode, seeded: Seeded, tally: Tally,
                    caught: InternalErrors, cases: int, run_seed: int) -> None:
    tool = BY_NAME.get(operation.definition.raw.get("operationId", ""))
    real = real_values(seeded, waits=tool is not None and tool.waits)
    fields = [] if tool is None else [name for name in tool.request.model_fields if name not in tool.path_fields()]
    authorization = f"Bearer {seeded.key}"

    @seed(run_seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode), data=st.data())
    def cases_of(case: schemathesis.Case, data: st.DataObject) -> None:
        case.path_parameters = substitute_real(data.draw, case.path_parameters or {}, real)
        case.query = substitute_real(data.draw, case.query or {}, real)
        if isinstance(case.body, dict):
            case.body = substitute_real(data.draw, case.body, real)
        case.headers = {**(case.headers or {}), "authorization": authorization}
        _send(case, tally, caught, checked_refusal=True)
        for _ in range(2):
            _send(_mutated(data.draw, case, real, fields, seeded.key), tally, caught, checked_refusal=False)

    try:
        cases_of()
    except Unsatisfiable:
        # Parameters that admit every value (a plain string) have no refused data either.
        if mode is not GenerationMode.NEGATIVE:
            raise


def _send(case: schemathesis.Case, tally: Tally, caught: InternalErrors, *, checked_refusal: bool) -> None:
    target = case.operation.label
    with tally.case(target):
        try:
            response = case.call()
        except Exception as error:  # noqa: BLE001 -- the transport or the app crashed: a finding
            tally.fail(target, "the request raised", str(error), _request(case), error)
            return
    if response.status_code >= 500:
        tally.fail(target, f"{response.status_code}", response.text, _request(case), caught.take())
    elif response.status_code >= 400:
        problem = problem_in_error_body(response.status_code, _json(response.content))
        if problem is not None:
            tally.fail(target, *problem, _request(case))
    try:
        case.validate_response(response, excluded_checks=[] if checked_refusal else [negative_data_rejection])
    except FailureGroup as group:
        for failure in group.exceptions:
            if "Server error" not in failure.title:  # reported above, with its exception
                tally.fail(target, failure.title, failure.message.strip(), _request(case))


def _mutated(draw: st.DrawFn, case: schemathesis.Case, real: dict[str, list[Any]], fields: list[str], key: str
             ) -> schemathesis.Case:
    """A copy of the case with one place spoiled: the JSON body (sent raw, so NaN and Infinity go as
    written), the query string, a path parameter, or the Authorization header."""
    mutant = case.derive()
    places = [p for p, present in (("body", isinstance(case.body, dict)), ("query", bool(len(case.operation.query))),
                                   ("path", bool(case.path_parameters)), ("header", True)) if present]
    place = draw(st.sampled_from(places))
    if place == "body":
        mutant.body = json.dumps(mutate(draw, case.body, real, fields)[0], default=str).encode("utf-8")
    elif place == "query":
        mutant.query = {k: _query_value(v) for k, v in mutate(draw, dict(case.query or {}), real, fields)[0].items()
                        if v is not None}
    elif place == "path":
        name = draw(st.sampled_from(sorted(case.path_parameters)))
        value = draw(st.sampled_from([v for v in HOSTILE if isinstance(v, str | int) and v != ""]))
        mutant.path_parameters = {**case.path_parameters, name: value}
    else:
        spelled = draw(st.sampled_from(BAD_AUTHORIZATION)).format(key=key)
        mutant.headers = {**(case.headers or {}), "authorization": spelled}
    return mutant


def _query_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return json.dumps(value)  # NaN and Infinity as JSON writes them
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        return [_query_value(item) for item in value if item is not None]
    return value


def _request(case: schemathesis.Case) -> dict[str, Any]:
    body = case.body.decode("utf-8", "replace") if isinstance(case.body, bytes) else case.body
    request = {"path": case.formatted_path, "query": case.query or None,
               "body": None if type(body).__name__ == "NotSet" else body}
    auth = (case.headers or {}).get("authorization", "")
    if not auth.startswith("Bearer ws_"):
        request["authorization"] = auth
    return {k: v for k, v in request.items() if v is not None}


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace")
