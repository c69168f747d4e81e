"""docs/asyncapi.json: a valid AsyncAPI 3 document, up to date with the op table, whose
references all resolve and whose payloads are valid JSON Schemas."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from pydantic_asyncapi.v3 import AsyncAPI

from models.requests import PARSERS
from server.apidocs.asyncapi import asyncapi, render
from tests.server_process import ROOT

DOC_PATH = ROOT / "docs" / "asyncapi.json"


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_file_is_what_the_op_table_builds() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/asyncapi.json is stale: python -m server.apidocs.asyncapi > docs/asyncapi.json"
    )


def test_valid_asyncapi_3() -> None:
    doc = json.loads(DOC_PATH.read_text(encoding="utf-8"))
    model = AsyncAPI.model_validate(doc)
    assert model.asyncapi == "3.0.0"
    for ref in refs(doc):
        assert resolve(doc, ref) is not None, ref
    for message in doc["components"]["messages"].values():
        jsonschema.Draft7Validator.check_schema(message["payload"])


def test_every_op_and_push_is_described() -> None:
    doc = asyncapi()
    messages = doc["components"]["messages"]
    for op in PARSERS:
        request = messages[f"{op}_request"]["payload"]
        assert request["properties"]["op"] == {"const": op}
        assert {"id", "op"} <= set(request["required"])
        assert op in doc["operations"]
    assert {"push_match", "push_lagged", "push_ended", "error"} <= set(messages)
    sample = {"id": 3, "op": "get", "collection": "c", "limit": 10, "cursor": "AWE"}
    jsonschema.validate(sample, messages["get_request"]["payload"])
    try:
        jsonschema.validate({**sample, "were": {}}, messages["get_request"]["payload"])
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an unknown argument passed the request schema")
