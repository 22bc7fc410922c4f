"""The router's tokenizer and chat templates give what transformers gives, without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from baton.server.router.model_files import router_model
from baton.server.router.tokenizer import TemplateError, Tokenizer

# Templates in the shapes the supported families ship (Llama 3, Qwen 2.5 with tools, Mistral's
# role check), beside the default model's own.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
QWEN_TOOLS = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n{%- endif %}\n"
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + "
    "'<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
ALTERNATING = (
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{% for message in messages %}{% if message['role'] != 'system' and "
    "(message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if loop.index0 > 10 %}{% break %}{% endif %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + eos_token }}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Héllo, wörld! 你好 ✓"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": 'Again, with "quotes" and {braces}'},
    ],
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def folder(smollm2, tmp_path_factory):
    """The default model's tokenizer files (the cached GGUF conversion holds them)."""
    src = smollm2.engine.model_dir
    dst = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    return dst


def with_template(folder, template, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(template)
    return Tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))


def hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", ["default", "llama3", "qwen-tools", "alternating"])
def test_templates_render_as_transformers_renders_them(folder, tmp_path, name):
    template = {"llama3": LLAMA3, "qwen-tools": QWEN_TOOLS, "alternating": ALTERNATING}.get(name)
    if template is None:
        ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    else:
        ours, hf = with_template(folder, template, tmp_path)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            for tools in (None, TOOLS) if name == "qwen-tools" else (None,):
                kw = dict(add_generation_prompt=gen, tools=tools)
                want = hf.apply_chat_template(messages, tokenize=False, **kw)
                assert ours.render_chat(messages, **kw) == want
                assert ours.apply_chat_template(messages, **kw) == hf_ids(hf, messages, **kw)


def test_a_template_that_refuses_the_conversation_says_why(folder, tmp_path):
    ours, _ = with_template(folder, ALTERNATING, tmp_path)
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(TemplateError, match="roles must alternate"):
        ours.apply_chat_template(bad)


def test_encode_decode_and_vocab_match_transformers(folder):
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert len(ours) == len(hf)
    for text in ["Hello world.", "  spaces  and\ttabs\n", "ünïcödé 你好 🙂", "<|im_start|>x"]:
        ids = hf.encode(text)
        assert ours.encode(text) == ids
        for skip in (False, True):
            kw = dict(skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, **kw)


def test_a_folder_without_tokenizer_json_is_refused(tmp_path, tiny_config_dir):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        router_model(tiny_config_dir)


def test_the_router_builds_without_torch_or_transformers(smollm2):
    """In a fresh interpreter: the router's cluster and app for the default model."""
    code = (
        "import sys\n"
        "from baton.server.router.main import ServeConfig, build_cluster\n"
        "from baton.server.api.app import build_app\n"
        "b = build_cluster(ServeConfig(model='smollm2'))\n"
        "build_app(b, served_model_name='smollm2', metrics=b.metrics)\n"
        "print(b.tokenizer.encode('hi'))\n"
        "heavy = ('torch', 'transformers', 'safetensors', 'gguf', 'triton')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert json.loads(out[-1]) == []
