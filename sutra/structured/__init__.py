"""Structured outputs: generation constrained to a JSON schema, a regex, a choice or a grammar.

`StructuredOutputsParams` is the spec (plain data, on SamplingParams.structured_outputs); the
compiler (sutra.structured.compiler), the grammar engine behind it (sutra.structured.backend) and the
runner's matchers (sutra.structured.matchers) are loaded only where a spec is used.
"""

from sutra.structured.params import StructuredOutputsParams, json_schema_constraint

__all__ = ["StructuredOutputsParams", "json_schema_constraint"]
