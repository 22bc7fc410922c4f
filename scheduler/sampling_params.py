"""Per-request sampling parameters, validated once at the edge (pure Python)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# What a constraint may be (see baton.server.guided): a JSON schema, a regex, or a Lark grammar.
GUIDED_KINDS = ("json", "regex", "lark")
MAX_GUIDED_SPEC_BYTES = 1 << 17  # UTF-8 bytes: what a worker compiles, and the wire carries


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ValueError naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-k logprobs per generated token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output: every token stays inside `guided_spec`, read as `guided` says (empty:
    # free text). `guided_compact`: JSON without optional whitespace.
    guided: str = ""
    guided_spec: str = ""
    guided_compact: bool = False
    # Prefix-cache tenant: blocks are shared only between requests with the same salt, so one
    # tenant's cache hits (and their timing) are invisible to another.
    cache_salt: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # NOTE: accept lists/str for convenience; store tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is None:
            object.__setattr__(self, "stop_token_ids", ())
        else:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        def check_num(name: str, kinds: tuple[type, ...]) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise bad(name, "wrong type")
            if isinstance(v, float) and v != v:
                raise bad(name, "must not be NaN")

        for name in ("n", "top_k", "min_tokens"):
            check_num(name, (int,))
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            check_num(name, (int, float))
        if self.n < 1 or self.n > 128:
            raise bad("n", "must be in [1, 128]")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be -1, 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or self.seed < 0
            or self.seed >= 2**63
        ):
            raise bad("seed", "must be a non-negative 64-bit integer")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be a positive integer")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens: must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")

        if self.guided not in ("", *GUIDED_KINDS):
            raise bad("guided", f"must be one of {GUIDED_KINDS} or empty")
        if not isinstance(self.guided_spec, str) or bool(self.guided) != bool(self.guided_spec):
            raise bad("guided_spec", "must be a non-empty string exactly when guided is set")
        if len(self.guided_spec.encode()) > MAX_GUIDED_SPEC_BYTES:
            raise ValueError(
                f"guided_spec: {len(self.guided_spec.encode())} bytes exceed "
                f"{MAX_GUIDED_SPEC_BYTES}"
            )

        if not isinstance(self.cache_salt, str) or len(self.cache_salt) > 256:
            raise bad("cache_salt", "must be a string of at most 256 characters")

    def choice(self, i: int) -> SamplingParams:
        """Choice `i` of an n-way request, run as a sequence of its own: n == 1 and, with a seed,
        seed + i, so the choices differ and each can be reproduced alone."""
        seed = None if self.seed is None else (self.seed + i) % 2**63
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
