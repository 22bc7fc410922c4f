"""Tool calling: tools into the prompt, `tool_choice` into a grammar, tool calls out of the text.

The format is Hermes': one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block per
call, the JSON on a line of its own.
A chat template with a tool format gets the tools as its `tools` variable; one without (the
default model's) gets them in a system message, `TOOL_PROMPT`, and earlier calls and tool
answers written in the same tags. `required` and a named function are enforced by a grammar
whose arguments follow each function's JSON schema; `auto` parses whatever calls the model wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from baton.server.api import protocol as p
from baton.server.api import responses
from baton.server.api.structured import Constraint, InvalidConstraint

TOOL_PROMPT = """You can call functions. Their JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with one <tool_call></tool_call> block per call, each holding a JSON \
object with the function's name and its arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{"<argument>": "<value>"}}}}
</tool_call>"""

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|(?=<tool_call>)|$)", re.DOTALL)
OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[p.ToolDef, ...]
    mode: str  # "auto", "required" or "named"
    name: str | None  # the function `named` forces
    parallel: bool

    @property
    def forced(self) -> bool:
        return self.mode != "auto"


def plan_tools(req: p.ChatCompletionRequest) -> ToolPlan | None:
    """What the request asks of its tools (None: no tools, or tool_choice none)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise InvalidConstraint("tool_choice", "needs tools")
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise InvalidConstraint("tools", "function names must be unique")
    if choice == "none":
        return None
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, p.NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidConstraint(
                "tool_choice", f"function {choice.function.name!r} is not among the tools"
            )
        return ToolPlan(tuple(req.tools), "named", choice.function.name, parallel)
    return ToolPlan(tuple(req.tools), choice or "auto", None, parallel)


def _call_schema(tool: p.ToolDef) -> dict:
    """One call of `tool` as a JSON schema: its name, then arguments its parameters allow. The
    parameters' local references (`#/$defs/...`, `#/definitions/...`, `#`) are rewritten to
    point where the parameters now sit."""
    params = _rebase_refs(tool.function.parameters or {"type": "object"}, "#/properties/arguments")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }


def _rebase_refs(node, base: str):
    if isinstance(node, list):
        return [_rebase_refs(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rebase_refs(v, base) for k, v in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref[1:]
    return out


def tool_constraint(plan: ToolPlan) -> Constraint | None:
    """The grammar `required` or a named function imposes (None for `auto`)."""
    if not plan.forced:
        return None
    tools = [t for t in plan.tools if plan.mode == "required" or t.function.name == plan.name]
    lines = ['start: call ("\\n" call)*' if plan.parallel else "start: call"]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    for i, t in enumerate(tools):
        lines.append(f'call_{i}: "{OPEN_TAG}\\n" args_{i} "\\n</tool_call>"')
        lines.append(f"args_{i}: %json {json.dumps(_call_schema(t))}")
    return Constraint("lark", "\n".join(lines), True, "tools")


def template_has_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tool_conversation(conv: list[dict], plan: ToolPlan | None) -> list[dict]:
    """`conv` for a template with no tool format: the tools in a system message, earlier calls
    and tool answers written in the tags the model is asked to use."""
    out = []
    for m in conv:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = [
                f"{OPEN_TAG}\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                )
                + "\n</tool_call>"
                for c in calls
            ]
            m["content"] = "\n".join(filter(None, [m.get("content"), *blocks]))
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if plan is not None:
        tools = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in plan.tools)
        prompt = TOOL_PROMPT.format(tools=tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _block(name: str, arguments) -> str:
    return f"{OPEN_TAG}\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def parse_tool_calls(
    text: str, plan: ToolPlan
) -> tuple[str | None, list[responses.ResponseToolCall]]:
    """(content left, calls) of a finished output. A block that is not a call of one of the
    tools (bad JSON, an unknown name) stays in the content, and so does every call after the
    first when the request said parallel_tool_calls false."""
    names = {t.function.name for t in plan.tools}
    calls: list[responses.ResponseToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        if calls and not plan.parallel:
            break  # parallel_tool_calls false: one call; what follows stays content
        call = _call_of(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip()
    if not calls:
        return text, []
    return content or None, calls


def _call_of(body: str, names: set[str]) -> responses.ResponseToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return responses.ResponseToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=responses.ResponseFunction(
            name=obj["name"], arguments=json.dumps(args, ensure_ascii=False)
        ),
    )


class ToolCallStream:
    """One streamed choice of a request with tools: text flows until a call may begin; from
    there it is held, and parsed into calls when the choice finishes."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held = ""
        self._in_call = plan.forced  # forced: every token is part of a call

    def feed(self, text: str) -> str:
        """The text that may be streamed as content now."""
        if self._in_call:
            self._held += text
            return ""
        text = self._held + text
        start = text.find(OPEN_TAG)
        if start >= 0:
            self._in_call, self._held = True, text[start:]
            return text[:start]
        keep = _partial_tag(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(
        self, finish_reason: str | None
    ) -> tuple[str, list[responses.ResponseToolCall], str | None]:
        """(content still held, calls, finish_reason) at the end of the choice. A forced choice
        cut by max_tokens keeps the calls it completed (finish_reason stays "length")."""
        held, self._held = self._held, ""
        parse = finish_reason == "stop" or (finish_reason == "length" and self.plan.forced)
        if not held or not parse:
            return held, [], finish_reason
        content, calls = parse_tool_calls(held, self.plan)
        if not calls:
            return held, [], finish_reason
        return content or "", calls, "tool_calls" if finish_reason == "stop" else finish_reason


def _partial_tag(text: str) -> int:
    """How many trailing characters of `text` could begin `<tool_call>`."""
    for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-n:]):
            return n
    return 0
