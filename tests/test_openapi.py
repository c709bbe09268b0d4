"""/openapi.json tells the truth: schemathesis throws generated requests at the live API and
checks every answer against the document (status codes, content types, bodies), and no 500."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.case import Case

from shared.ids import new_batch_id
from tests.fixtures_api import API_KEY, Api

MAX_EXAMPLES = 25  # per operation: about 20 operations, well under a minute in all


def excluded(case: Case) -> list[checks.CheckFunction]:
    """Checks that cannot hold for an operation, each with its reason.

    A submission has rules JSON Schema cannot state: `defaults` merge into every job, a model
    must be one this farm serves, `strength` needs an `init_image` that decodes to the job's
    size. So a schema-valid body may rightly be refused with 422 naming the rule; every other
    check (documented status, content type and body, no 500) still runs on it. An upload's body
    is "binary" to JSON Schema, but only a PNG or JPEG within the farm's bounds is accepted (422
    naming why otherwise): the same exclusion, for the same reason.
    """
    if case.operation.label in ("POST /v1/batches", "POST /v1/uploads"):
        return [checks.positive_data_acceptance]
    return []


def test_generated_requests_get_documented_answers_and_never_a_500(api: Api) -> None:
    # Given the live API, with one batch in it, and its published schema
    api.http.post("/v1/batches", json={"prompts": ["a lighthouse"]})
    # (the key goes in through the documented security scheme, so that schemathesis knows it)
    config = SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": API_KEY}}}}
    )
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    # When every operation gets valid and invalid generated requests
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Case) -> None:
                response = case.call()
                statuses.setdefault(case.operation.label, set()).add(response.status_code)
                case.validate_response(response, excluded_checks=excluded(case))

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # no parameters: nothing to get wrong
            except BaseExceptionGroup as e:  # collect every operation's findings, report them all
                failures.append(f"{operation.label} ({mode.value}): {e}")
    # Then each answer matched the document, and none was a server error
    assert len(operations) >= 14
    assert not failures, "\n\n".join(failures)
    # And the requests got past the key check (a farm that answered 401 to all proves nothing)
    assert 200 in statuses["GET /v1/workers"]
    assert 200 in statuses["GET /v1/batches"]


def test_every_route_documents_its_success_and_error_bodies(api: Api) -> None:
    document = httpx.get(f"{api.url}/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            ok = [code for code in responses if code.startswith("2")]
            assert ok, f"{method} {path} documents no success"
            if path.startswith("/v1"):
                assert "401" in responses, f"{method} {path} does not document 401"
                assert responses["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"
                }
    body = document["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/x-ndjson"}
    assert "BatchCreate" in document["components"]["schemas"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_an_unknown_batch_is_a_404_in_the_documented_shape(api: Api) -> None:
    response = api.http.get(f"/v1/batches/{new_batch_id()}")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
