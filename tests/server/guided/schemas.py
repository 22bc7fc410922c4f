"""A dozen varied JSON schemas (and a prompt for each) that constrained outputs must validate
against; shared by the engine tests and the served ones."""

from __future__ import annotations

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    "tags": {
        "type": "array",
        "items": {"type": "string", "maxLength": 12},
        "minItems": 1,
        "maxItems": 3,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "bounded_number": {
        "type": "object",
        "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
        "required": ["score"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "subtitle": {"type": "string", "maxLength": 30},
            "pages": {"type": "integer", "minimum": 1, "maximum": 999},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "flags": {
        "type": "object",
        "properties": {"done": {"type": "boolean"}, "note": {"type": "null"}},
        "required": ["done", "note"],
        "additionalProperties": False,
    },
    "items": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "maxLength": 8},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "id": {
                "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 10}]
            }
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "const": {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "level": {"enum": [1, 2, 3]},
        },
        "required": ["version", "level"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "maxItems": 4,
    },
}

PROMPTS = {
    "person": "Describe a person.",
    "nested": "Where is Paris?",
    "tags": "Give tags for a blog post about cooking.",
    "enum": "Pick a color.",
    "bounded_number": "Rate this movie.",
    "optional": "Describe a book.",
    "flags": "Is the task done?",
    "items": "Write an order.",
    "pattern": "Give an airport code with a number.",
    "any_of": "Give an identifier.",
    "const": "Give the settings.",
    "numbers": "List a few small numbers.",
}
