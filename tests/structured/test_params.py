"""The spec's shape is checked on construction, errors name the field it came from, and equal specs
share one cache key however their JSON was written."""

from __future__ import annotations

import pytest

from sutra.errors import InvalidRequestError
from sutra.sampling_params import SamplingParams, StructuredOutputsParams
from sutra.structured import json_schema_constraint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of json, regex, choice, grammar or json_object must be set, got none"),
        ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
        ({"choice": []}, "choice must be a non-empty list of strings"),
        ({"choice": ["a", 3]}, "choice must hold only strings"),
        ({"choice": ["a", ""]}, "choice must not hold an empty string"),
        ({"choice": "ab"}, "choice must be a non-empty list of strings"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"grammar": "  "}, "grammar must be a non-empty string"),
        ({"json": "{not json"}, "the JSON schema is not valid JSON"),
        ({"json": [1, 2]}, "a JSON schema must be an object, got list"),
        ({"json": 3}, "a JSON schema must be an object, got int"),
        ({"json": {"type": "number", "maximum": float("nan")}}, "non-finite number"),
        ({"json_object": "yes"}, "json_object must be true when set"),
    ],
)
def test_malformed_specs_are_refused_naming_their_source(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        StructuredOutputsParams(**kwargs, source="guided_json")
    assert e.value.param == "guided_json"
    assert str(e.value).startswith("guided_json: ")


def test_equal_schemas_share_one_key_whatever_their_key_order_or_form():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    b = StructuredOutputsParams(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}')
    assert a.cache_key() == b.cache_key()
    assert a.json == b.json  # the text form is parsed
    assert a.cache_key() != StructuredOutputsParams(json={"type": "object"}).cache_key()
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert StructuredOutputsParams(choice=("a", "b")).choice == ["a", "b"]


def test_deeply_nested_schema_is_refused_not_a_crash():
    schema: dict = {}
    for _ in range(5000):
        schema = {"anyOf": [schema]}
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        StructuredOutputsParams(json=schema)


def test_sampling_params_takes_the_spec_or_a_mapping_of_it():
    spec = StructuredOutputsParams(regex="[0-9]+")
    assert SamplingParams(structured_outputs=spec).structured_outputs is spec
    converted = SamplingParams(structured_outputs={"choice": ["yes", "no"]}).structured_outputs
    assert converted == StructuredOutputsParams(choice=["yes", "no"])
    with pytest.raises(InvalidRequestError, match="unknown key") as e:
        SamplingParams(structured_outputs={"choices": ["yes"]})
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidRequestError, match="must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs="[0-9]+")
    assert SamplingParams().structured_outputs is None


def test_json_schema_constraint_is_the_spec_other_features_build():
    spec = json_schema_constraint({"type": "array", "minItems": 1}, source="tool_choice")
    assert spec.kind == "json" and spec.source == "tool_choice"
    with pytest.raises(InvalidRequestError) as e:
        json_schema_constraint("nope", source="tool_choice")
    assert e.value.param == "tool_choice"
