"""The OpenAPI document: valid 3.1, served by a real server, and held to the request parser so
that it cannot drift from what the server accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from models.config import Limits
from models.errors import BadRequest, ShoalError
from models.op_schema import args_schema, op_args, openapi
from models.requests import PARSERS, parse_request
from tests.server_process import ROOT, ServerProcess

pytestmark = pytest.mark.timeout(60)
LIMITS = Limits()
OPS = op_args(LIMITS)
# The argument an accessor reads when called without a name (models/requests.py `Args`).
DEFAULT_KEYS = {
    "collection_name": "collection",
    "ids": "ids",
    "include": "include",
    "where": "where",
    "where_text": "where_text",
    "vector": "vector",
    "text": "text",
}


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(openapi(LIMITS))


def test_every_op_is_documented() -> None:
    assert set(OPS) == set(PARSERS)


@pytest.mark.parametrize("op", sorted(PARSERS))
def test_examples_parse_and_cover_every_documented_argument(op: str) -> None:
    spec = OPS[op]
    assert spec.examples, f"{op} has no example"
    covered: set[str] = set()
    for example in spec.examples:
        parse_request(op, example, LIMITS)  # raises if the parser refuses a documented argument
        jsonschema.validate(example, args_schema(spec))
        covered |= set(example)
    assert covered == set(spec.args), f"{op}: documented arguments no example uses"
    for name, arg in spec.args.items():
        if arg.required:
            without = {k: v for k, v in spec.examples[0].items() if k != name}
            with pytest.raises(ShoalError):
                parse_request(op, without, LIMITS)


@pytest.mark.parametrize("op", sorted(PARSERS))
def test_an_undocumented_argument_is_refused(op: str) -> None:
    example: dict[str, Any] = {**OPS[op].examples[0], "undocumented": 1}
    with pytest.raises(BadRequest, match="unknown argument"):
        parse_request(op, example, LIMITS)


def test_every_argument_the_parser_reads_is_documented() -> None:
    """Reads models/requests.py: each argument name an accessor is called with, by name or by
    its default, must be documented for some op (a new argument without its spec fails here)."""
    source = (ROOT / "models" / "requests.py").read_text(encoding="utf-8")
    accessors = "_get|has|string|boolean|integer|number|ids|vector|text|collection_name"
    named = set(re.findall(rf"\ba\.(?:{accessors})\(\s*\"(\w+)\"", source))
    defaults = {DEFAULT_KEYS[m] for m in re.findall(r"\ba\.(\w+)\(\s*[)a-z]", source) if m in DEFAULT_KEYS}
    documented = {name for spec in OPS.values() for name in spec.args}
    assert named, "the accessor pattern no longer matches models/requests.py"
    assert (named | defaults) - documented == set()


def test_bounds_follow_the_limits() -> None:
    small = Limits(max_k=7, max_ids=9)
    ops = op_args(small)
    assert ops["query"].args["k"].schema["maximum"] == 7
    assert ops["get"].args["limit"].schema["maximum"] == 9


def test_served_document_and_docs_page(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url) as http:
        spec = http.get("/openapi.json")
        assert spec.status_code == 200 and spec.headers["content-type"].startswith("application/json")
        body = spec.json()
        validate(body)
        assert body["paths"]["/v1/collections/{name}/get"]["post"]["requestBody"]["content"]["application/json"]
        page = http.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # Nothing is loaded from elsewhere: no absolute URL in a src or href.
        assert not re.search(r"(src|href)\s*=\s*\"(https?:)?//", page.text)
        assert "/openapi.json" in page.text
        assert http.post("/openapi.json").status_code == 405


def test_docs_page_ships_with_the_package() -> None:
    assert (Path(ROOT) / "server" / "apidocs" / "docs.html").is_file()
