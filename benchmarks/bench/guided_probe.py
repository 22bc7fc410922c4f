"""guided_cost's parts: the schemas it constrains with, compile timing, and the probe that times
the guided work inside engine steps."""

from __future__ import annotations

import itertools
import json
import statistics
import time

# The rows' constraint: a list of people that cannot close before 1000 of them, so no row's
# grammar completes (which ends the row) while steps are timed. Keys, strings, integers and
# nested arrays: the lexer states a real JSON reply goes through.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}
STEP_SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 1000}},
    "required": ["people"],
}
PROMPT = (
    "Write a JSON object with a list of people. For each person give their name, their age and "
    "a few tags that describe their hobbies and their job, one person after another. The list:"
)


def compile_schemas() -> dict[str, dict]:
    """Schemas of three sizes for the compile timings."""
    small = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    medium = {
        "type": "object",
        "properties": {
            **PERSON["properties"],
            "email": {"type": "string", "maxLength": 80},
            "role": {"enum": ["admin", "editor", "viewer", "guest", "owner"]},
            "active": {"type": "boolean"},
            "score": {"type": "number", "minimum": 0, "maximum": 100},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
            },
        },
        "required": ["name", "age", "email", "role", "address"],
    }
    kinds = [
        lambda i: {"type": "string", "maxLength": 64},
        lambda i: {"type": "integer", "minimum": 0, "maximum": 10_000},
        lambda i: {"enum": [f"choice_{i}_{j}" for j in range(24)]},
        lambda i: {
            "type": "object",
            "properties": {
                f"sub_{j}": {"type": ["string", "number", "boolean"][j % 3]} for j in range(6)
            },
            "required": [f"sub_{j}" for j in range(0, 6, 2)],
        },
        lambda i: {"type": "array", "items": medium, "maxItems": 8},
        lambda i: {
            "anyOf": [{"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, {"type": "null"}]
        },
    ]
    props = {f"field_{i}": kinds[i % len(kinds)](i) for i in range(48)}
    large = {"type": "object", "properties": props, "required": list(props)[::2]}
    return {"small": small, "medium": medium, "large": large}


def json_params(spec: str, **kw):
    from baton import SamplingParams

    return SamplingParams(guided="json", guided_spec=spec, **kw)


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- compile ------------------------------------------------------------------------------------


def measure_compile(engine, reps: int):
    """Compile timings on a GuidedDecoding of its own (the engine's stays untouched); returns them
    and the llguidance tokenizer built for the timing (it checks the rows' outputs later)."""
    import llguidance

    from baton.server.guided.decoding import GuidedDecoding

    mc = engine.model_config
    eos = [e for e in dict.fromkeys([engine.eos_token_id, *mc.eos_token_ids]) if e is not None]
    gd = GuidedDecoding(engine.model_dir, mc.vocab_size, eos)
    ids = itertools.count()

    def ready_ms(params) -> float:  # start to matcher ready, as a request's admission sees it
        sid = f"compile-{next(ids)}"
        t0 = time.perf_counter()
        gd.start(sid, params, [])
        gd.ready(sid, wait=True)
        dt = ms(t0)
        gd.release(sid)
        return dt

    schemas = compile_schemas()
    first = ready_ms(json_params(json.dumps({**schemas["small"], "title": "first"})))
    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(
        str(engine.model_dir / "tokenizer.json"), n_vocab=mc.vocab_size, eos_token=eos or None
    )
    tokenizer_ms = ms(t0)
    rows = []
    for name, schema in schemas.items():
        spec = json.dumps(schema)
        cold = [
            ready_ms(json_params(json.dumps({**schema, "title": f"cold {r}"}))) for r in range(reps)
        ]
        same = json_params(spec)
        ready_ms(same)  # compiled once, untimed: the cache holds it from here on
        cached = [ready_ms(same) for _ in range(3 * reps)]
        check = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gd.check(same)  # every constrained request pays it at admission, cached or not
            check.append(ms(t0))
        rows.append(
            {
                "schema": name,
                "spec_bytes": len(spec),
                "cold_ms": median(cold),
                "cached_ms": median(cached),
                "check_ms": median(check),
                "cold_trials_ms": cold,
                "cached_trials_ms": cached,
            }
        )
    result = {
        "first_compile_incl_tokenizer_ms": first,
        "tokenizer_build_ms": tokenizer_ms,
        "num_compiled": gd.num_compiled,
        "schemas": rows,
    }
    return result, tok


# ---- steps --------------------------------------------------------------------------------------


class Probe:
    """Host time of the guided work inside each engine step: the mask of the constrained rows
    (GuidedDecoding.bitmask), its application (the sampler's apply_bitmask) and the matchers'
    advance (GuidedDecoding.accept). On CUDA apply is its launch, not its kernel time."""

    def __init__(self, engine) -> None:
        import baton.server.sampler as sampler

        self.guided, self.sampler = engine.guided, sampler
        self.reset()

    def reset(self) -> None:
        self.mask = self.apply = self.accept = 0.0
        self.mask_rows = 0
        self.bitmask = None  # this step's mask, for the allowed share (counted after the step)

    def __enter__(self) -> Probe:
        g, bitmask, accept = self.guided, self.guided.bitmask, self.guided.accept
        apply = self._apply = self.sampler.apply_bitmask

        def timed_bitmask(seq_ids):
            t0 = time.perf_counter()
            r = bitmask(seq_ids)
            self.mask += ms(t0)
            self.mask_rows, self.bitmask = (0, None) if r is None else (len(r[0]), r[1])
            return r

        def timed_accept(seq_id, token):
            t0 = time.perf_counter()
            r = accept(seq_id, token)
            self.accept += ms(t0)
            return r

        def timed_apply(logits, rows, bitmask_):
            t0 = time.perf_counter()
            r = apply(logits, rows, bitmask_)
            self.apply += ms(t0)
            return r

        g.bitmask, g.accept, self.sampler.apply_bitmask = timed_bitmask, timed_accept, timed_apply
        return self

    def __exit__(self, *exc) -> None:
        del self.guided.bitmask, self.guided.accept  # the class's methods again
        self.sampler.apply_bitmask = self._apply


def isolated(engine, ids: list[str], reps: int) -> dict | None:
    """After the timed steps, on their own: the batch's mask asked again of the same matcher
    states (llguidance answers a state it has just computed from its cache: a floor, not the
    per-step cost, which the in-step timing gives), and its application to [B, vocab] float32
    logits on the device, synchronized (on CUDA the in-step figure is only the launch)."""
    import torch

    from baton.server.guided.bitmask import apply_bitmask

    g, dev, vocab = engine.guided, engine.device, engine.model_config.vocab_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    mask_ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        got = g.bitmask(ids)
        mask_ms.append(ms(t0))
    if got is None:  # no row has a matcher: nothing is masked
        return None
    rows, mask = got
    logits = torch.randn(len(ids), vocab, device=dev)
    rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
    apply_ms = []
    for _ in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        apply_bitmask(logits, rows_t, mask)
        sync()
        apply_ms.append(ms(t0))
    return {"bitmask_same_state_ms": median(mask_ms), "apply_ms": median(apply_ms[2:])}


def allowed_share(bitmask, vocab: int) -> float:
    """The share of the vocabulary a step's mask allows, over its rows."""
    from baton.server.guided.bitmask import allowed_tokens

    return allowed_tokens(bitmask, vocab).float().mean().item()
