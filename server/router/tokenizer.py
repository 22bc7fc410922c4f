"""The router's tokenizer: `tokenizer.json` through `tokenizers`, chat templates through jinja2.

The router needs to encode prompts, decode tokens and render chat templates, nothing more, so
it does without transformers (which imports torch): the same files, read the same way. Chat
templates render under transformers' rules (a sandboxed environment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that keeps
non-ASCII text), with the special tokens of `tokenizer_config.json` in scope.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Tokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class TemplateError(ValueError):
    """A chat template refused the conversation (its own `raise_exception`, or a jinja error)."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str):
    raise TemplateError(message)


def compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """What the router asks of a tokenizer, from a folder holding `tokenizer.json`."""

    def __init__(self, folder: Path) -> None:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"model: {folder} has no tokenizer.json; the router reads only that format"
            )
        self._tok = _Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special_tokens = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        template_path = folder / "chat_template.jinja"
        source = template_path.read_text() if template_path.is_file() else None
        source = source or config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self.chat_template = source
        self._template = compile_template(source) if source else None

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self,
        ids: list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("clean_up_tokenization_spaces is not supported by the router")
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        if self._template is None:
            raise TemplateError("this model has no chat template; use /v1/completions")
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in self.special_tokens.items() if v is not None},
            )
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from None

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int] | str:
        """As transformers': the rendered text, or its ids without added special tokens (the
        template writes its own)."""
        text = self.render_chat(messages, add_generation_prompt, tools)
        return self.encode(text, add_special_tokens=False) if tokenize else text
