"""Which worker gets a request, and which workers may join the pool (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from baton.scheduler.kv_index import KVIndex
from baton.scheduler.routing import Chooser, RoutingConfig


@dataclass
class WorkerState:
    """What the router knows of one worker, from its registration and heartbeats."""

    worker_id: str
    role: str  # "prefill", "decode" or "both"
    pid: int
    host: str
    model: str
    layout: tuple  # (num_layers, block_size, num_kv_heads, head_dim, dtype)
    kv_endpoint: str
    max_model_len: int
    num_blocks: int
    last_seen: float
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    rss_bytes: int = 0  # the worker process's resident memory, from its heartbeats
    kv_resident_bytes: int = 0  # how much of its KV cache is resident
    assigned: set[str] = field(default_factory=set)  # request ids the router sent here
    served: int = 0  # requests ever placed here
    state: str = "ready"  # "ready", "draining" (finishing its work, takes none) or "dead"
    # how it runs on its CPU: threads, wait_policy, cpus, linear (None: not a CPU worker)
    cpu: dict | None = None

    @property
    def load(self) -> int:
        # NOTE: heartbeats lag; requests assigned since the last one count too.
        return max(self.running + self.waiting, len(self.assigned))

    def as_dict(self) -> dict:
        return {
            "id": self.worker_id,
            "role": self.role,
            "pid": self.pid,
            "host": self.host,
            "state": self.state,
            "running": self.running,
            "waiting": self.waiting,
            "assigned": len(self.assigned),
            "served": self.served,
            "kv_endpoint": self.kv_endpoint,
            "kv_usage": self.kv_usage,
            "num_free_blocks": self.num_free_blocks,
            "num_blocks": self.num_blocks,
            "rss_bytes": self.rss_bytes,
            "kv_resident_bytes": self.kv_resident_bytes,
            "cpu": self.cpu,
        }

    @property
    def cpu_linear(self) -> str:
        return (self.cpu or {}).get("linear", "")


class Pool:
    """The registered workers. The first one fixes the model and KV layout; later ones must
    match, so a request never fails on a mismatch found mid-handoff.

    NOTE: every change to a worker's state goes through a method here (admit, seen, beat,
    assign, release, lose, remove); a `WorkerState` is data the pool mutates."""

    def __init__(
        self, mode: str, model: str | None = None, routing: RoutingConfig | None = None
    ) -> None:
        if mode not in ("disagg", "colocated"):
            raise ValueError(f"mode: must be 'disagg' or 'colocated', got {mode!r}")
        self.mode = mode
        self.model = model
        self.layout: tuple | None = None
        self.workers: dict[str, WorkerState] = {}
        self.index = KVIndex()  # what each worker holds, from its KV events
        self.chooser = Chooser(routing or RoutingConfig(), self.index.matched)

    def admit(self, w: WorkerState) -> str | None:
        """Add `w`, or return why it is refused."""
        roles = ("prefill", "decode") if self.mode == "disagg" else ("both",)
        if w.role not in roles:
            return f"role {w.role!r} does not serve a {self.mode} pool (wants {' or '.join(roles)})"
        if self.model is not None and w.model != self.model:
            return f"model {w.model!r} differs from the pool's {self.model!r}"
        if self.layout is not None and tuple(w.layout) != self.layout:
            return f"KV layout {tuple(w.layout)} differs from the pool's {self.layout}"
        if w.role == "decode" and not w.kv_endpoint:
            return "a decode worker must publish a KV endpoint"
        plan = self.cpu_linear
        if w.cpu_linear and plan and w.cpu_linear != plan:
            # NOTE: the plan sets float32 rounding: a request resumed on another worker after a
            # failure would no longer continue the same greedy text.
            return (
                f"its float32 CPU linear plan {w.cpu_linear!r} differs from the pool's {plan!r}; "
                f"start it with --cpu-linear {plan}"
            )
        self.model = w.model
        self.layout = tuple(w.layout)
        self.workers[w.worker_id] = w
        self.index.add_worker(w.worker_id, w.num_blocks)
        return None

    @property
    def block_size(self) -> int:
        return self.layout[1] if self.layout else 16

    def seen(self, worker_id: str, now: float) -> None:
        """A message came from the worker: it is alive at `now`."""
        self.workers[worker_id].last_seen = now

    def beat(
        self,
        worker_id: str,
        *,
        draining: bool,
        running: int,
        waiting: int,
        kv_usage: float,
        num_free_blocks: int,
        rss_bytes: int = 0,
        kv_resident_bytes: int = 0,
    ) -> None:
        """The worker's heartbeat: its load, free KV, memory, and whether it is draining."""
        w = self.workers[worker_id]
        if draining and w.state != "draining":
            self.index.drop(worker_id)  # it takes nothing new: its cache attracts nothing
        w.state = "draining" if draining else "ready"
        w.running, w.waiting = running, waiting
        w.kv_usage, w.num_free_blocks = kv_usage, num_free_blocks
        w.rss_bytes, w.kv_resident_bytes = rss_bytes, kv_resident_bytes

    def assign(self, request_id: str, worker_ids: list[str], blocks: int = 0) -> None:
        """The request was placed on these workers; the one that decodes it will hold `blocks`.

        NOTE: heartbeats lag, as for `load`: until the next one says what the worker really has
        free, the router counts the blocks it sent there as taken. Without that, every request of
        a burst went to the same decode worker, the one that had the most free at the last beat.
        """
        for wid in worker_ids:
            w = self.workers[wid]
            w.assigned.add(request_id)
            w.served += 1
            if w.role == self.decode_role:
                w.num_free_blocks = max(0, w.num_free_blocks - blocks)

    def release(self, request_id: str, worker_id: str) -> None:
        """The request no longer depends on the worker."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.assigned.discard(request_id)

    def lose(self, worker_id: str) -> list[str]:
        """Mark the worker dead; returns the requests assigned to it, which it holds no more."""
        w = self.workers[worker_id]
        w.state = "dead"
        self.index.drop(worker_id)
        lost = list(w.assigned)
        w.assigned.clear()
        return lost

    def remove(self, worker_id: str) -> None:
        """The worker left the pool."""
        del self.workers[worker_id]
        self.index.drop(worker_id)

    def prune_dead(self, keep: int = 16) -> list[str]:
        """Forget all but the `keep` most recently heard-from dead workers; returns the ids
        forgotten. NOTE: every restart or rollout brings new worker ids, so without this the
        pool (and `/workers`) would grow for as long as the router runs."""
        dead = sorted(
            (w for w in self.workers.values() if w.state == "dead"),
            key=lambda w: (w.last_seen, w.worker_id),
        )
        gone = [w.worker_id for w in dead[: max(0, len(dead) - keep)]]
        for wid in gone:
            self.remove(wid)
        return gone

    @property
    def cpu_linear(self) -> str:
        """The float32 CPU linear plan the live workers run ("" where none runs one)."""
        plans = (w.cpu_linear for w in self.workers.values() if w.state != "dead")
        return next((p for p in plans if p), "")

    def ready(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.role == role and w.state == "ready"]

    @property
    def first_role(self) -> str:
        """The role that takes a new request's prompt."""
        return "prefill" if self.mode == "disagg" else "both"

    @property
    def decode_role(self) -> str:
        """The role that generates after the first token (and recomputes a resumed request)."""
        return "decode" if self.mode == "disagg" else "both"

    def pick_prefill(
        self, exclude: frozenset[str] = frozenset(), keys: Sequence[int] = (), num_tokens: int = 0
    ) -> WorkerState | None:
        """By the routing policy (see baton.scheduler.routing)."""
        cands = [w for w in self.ready(self.first_role) if w.worker_id not in exclude]
        c = self.chooser.prefill(cands, keys, num_tokens, self.block_size)
        return c.worker if c else None

    def pick_decode(
        self, blocks_needed: int, exclude: frozenset[str] = frozenset(), keys: Sequence[int] = ()
    ) -> WorkerState | None:
        """By the routing policy, among those that could ever hold the request."""
        cands = [
            w
            for w in self.ready(self.decode_role)
            if w.num_blocks >= blocks_needed and w.worker_id not in exclude
        ]
        c = self.chooser.decode(cands, keys)
        return c.worker if c else None

    def plan(
        self,
        blocks_needed: int,
        resumed: bool,
        avoid: frozenset[str] = frozenset(),
        recompute_on: str | None = None,
        keys: Sequence[int] = (),
        num_tokens: int = 0,
    ) -> tuple[WorkerState, WorkerState | None] | None:
        """Where a request runs: (the worker it is sent to, the decode worker its KV is handed
        to, or None when the first one runs it all). None: nowhere now. `keys`: the prompt's
        block keys (see kv_index), `num_tokens` its length.

        A fresh request takes the usual path. One resumed after a failure (tokens already
        streamed) is recomputed on one decode-capable worker: `recompute_on` if it is ready
        (a failed handoff falls back to the decode side), else the best other one. With no
        prefill worker up, a fresh request is also run by a decode worker alone, and so is one
        whose uncached part is short, or when the prefill pool is backed up (see routing).
        """
        if recompute_on is not None and recompute_on not in avoid:
            w = self.workers.get(recompute_on)
            if w is not None and w.state == "ready" and w.num_blocks >= blocks_needed:
                return w, None
        if self.mode == "colocated":
            first = None if resumed else self.pick_prefill(avoid, keys, num_tokens)
            if first is not None:
                return first, None
        cands = [
            w
            for w in self.ready(self.decode_role)
            if w.num_blocks >= blocks_needed and w.worker_id not in avoid
        ]
        decode = self.chooser.decode(cands, keys)
        if decode is None:
            return None
        if resumed:
            return decode.worker, None
        prefills = [w for w in self.ready(self.first_role) if w.worker_id not in avoid]
        first = self.chooser.prefill(prefills, keys, num_tokens, self.block_size)
        if first is None:
            return decode.worker, None
        loads = [w.load for w in prefills]
        if num_tokens and self.chooser.prefill_locally(
            decode, first, num_tokens, self.block_size, loads
        ):
            return decode.worker, None
        return first.worker, decode.worker

    def never_fits(self, blocks_needed: int) -> str | None:
        """Why a request needing `blocks_needed` KV blocks (prompt + max_tokens) could never run
        where it decodes, or None. Whether blocks are free now is a matter of waiting."""
        caps = [
            w.num_blocks
            for w in self.workers.values()
            if w.role == self.decode_role and w.state != "dead"
        ]
        if caps and blocks_needed > max(caps):
            return (
                f"prompt + max_tokens need {blocks_needed} KV blocks; the largest "
                f"{self.decode_role} worker has {max(caps)}"
            )
        return None

    def silent(self, now: float, timeout: float) -> list[WorkerState]:
        """Live workers not heard from for `timeout` seconds (the caller `lose`s them)."""
        return [
            w for w in self.workers.values() if w.state != "dead" and now - w.last_seen > timeout
        ]

    def health(self) -> tuple[bool, str]:
        if self.mode == "colocated":
            ok = bool(self.ready("both"))
            return ok, "ready" if ok else "no colocated worker is ready"
        missing = [r for r in ("prefill", "decode") if not self.ready(r)]
        if missing:
            return False, f"no {' and no '.join(missing)} worker is ready"
        return True, "ready"
