"""Sampler: greedy, truncation, temperature, seeds, penalties, min_tokens and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence
from baton.server.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    token_counts,
)

EOS = 2


def make_seq(
    seq_id: str = "s", output: list[int] | None = None, prompt: list[int] | None = None, **kw
) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        prompt_token_ids=prompt or [5, 6, 7],
        params=SamplingParams(**kw),
        eos_token_id=EOS,
        output_token_ids=list(output or []),
    )


def rand_logits(n: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def tokens(results) -> list[int]:
    return [r.token_id for r in results]


def test_greedy_is_argmax():
    logits = rand_logits(8, 50)
    seqs = [make_seq(f"s{i}", temperature=0.0) for i in range(8)]
    assert tokens(Sampler()(logits, seqs)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0, 50.0])
def test_top_k_1_is_greedy(temperature):
    logits = rand_logits(16, 100, seed=1)
    seqs = [make_seq(f"s{i}", temperature=temperature, top_k=1) for i in range(16)]
    torch.manual_seed(0)
    assert tokens(Sampler()(logits, seqs)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 5.0])
def test_tiny_top_p_is_greedy(temperature):
    logits = rand_logits(16, 100, seed=2)
    seqs = [make_seq(f"s{i}", temperature=temperature, top_p=1e-6) for i in range(16)]
    torch.manual_seed(0)
    assert tokens(Sampler()(logits, seqs)) == logits.argmax(-1).tolist()


def test_top_k_top_p_masks():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    out = apply_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.75]))
    assert torch.isinf(out).tolist() == [[True, False, True, False], [True, False, True, False]]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])
    out = apply_top_k_top_p(logits, torch.tensor([3, 1]), None)
    assert torch.isinf(out).tolist() == [[True, False, False, False], [True, False, True, True]]


def test_min_p_mask():
    logits = torch.tensor([[0.5, 0.25, 0.2, 0.05]]).log()
    out = apply_min_p(logits, torch.tensor([0.45]))
    assert torch.isinf(out).tolist() == [[False, False, True, True]]
    assert torch.equal(apply_min_p(logits, torch.tensor([0.0])), logits)


def draw_many(logits_row: torch.Tensor, n: int, seed: int = 0, **kw) -> torch.Tensor:
    logits = logits_row.expand(n, -1).contiguous()
    seqs = [make_seq(f"s{i}", **kw) for i in range(n)]
    torch.manual_seed(seed)
    return torch.tensor(tokens(Sampler()(logits, seqs)))


def test_min_p_sampled_tokens_stay_in_allowed_set():
    row = rand_logits(1, 40, seed=3, scale=1.5)[0]
    probs = row.softmax(-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    drawn = set(draw_many(row, 4000, min_p=0.2).tolist())
    assert drawn <= allowed
    assert len(drawn) >= max(2, len(allowed) - 1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_temperature_frequencies_match_softmax(temperature):
    row = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0, -1.0])
    n = 20000
    counts = torch.bincount(draw_many(row, n, temperature=temperature), minlength=6).float()
    # 5 degrees of freedom: 20.5 is the 0.999 quantile
    assert chi_square(counts, (row / temperature).softmax(-1)) < 20.5


def test_top_k_frequencies_are_renormalised():
    row = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0, -1.0])
    counts = torch.bincount(draw_many(row, 20000, top_k=3), minlength=6).float()
    assert counts[[2, 4, 5]].sum() == 0
    kept = counts[[0, 1, 3]]
    assert chi_square(kept, row[[0, 1, 3]].softmax(-1)) < 13.8  # 2 dof, 0.999


def run_steps(sampler: Sampler, batch_fn, target: Sequence, steps: int) -> list[int]:
    """Samples `steps` tokens for `target`, placed in batches that batch_fn builds per step."""
    out = []
    for step in range(steps):
        seqs, logits = batch_fn(step, target)
        res = sampler(logits, seqs)
        tok = res[seqs.index(target)].token_id
        target.output_token_ids.append(tok)
        out.append(tok)
    return out


def target_logits(step: int) -> torch.Tensor:
    return rand_logits(1, 500, seed=100 + step, scale=1.0)


def test_seed_is_independent_of_the_batch():
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)

    def alone(step, target):
        return [target], target_logits(step)

    def mixed(step, target):
        others = [
            make_seq("a", temperature=1.3),
            make_seq("b", temperature=0.5, seed=7),
            make_seq("c", temperature=0.0),
            make_seq("d", top_k=5, min_p=0.1, seed=99),
        ]
        seqs = others[: step % 4] + [target] + others[step % 4 :]
        pos = seqs.index(target)
        logits = rand_logits(len(seqs), 500, seed=step)
        logits[pos] = target_logits(step)[0]
        return seqs, logits

    torch.manual_seed(0)
    ref = run_steps(Sampler(), alone, make_seq("t", **kw), 12)
    torch.manual_seed(1)
    got = run_steps(Sampler(), mixed, make_seq("t", **kw), 12)
    assert got == ref
    other_seed = run_steps(Sampler(), alone, make_seq("t", **{**kw, "seed": 4321}), 12)
    assert other_seed != ref


def test_release_restarts_the_generator():
    sampler = Sampler()
    seq = make_seq("t", seed=5)
    logits = rand_logits(1, 500, seed=9, scale=0.5)
    first = [sampler(logits, [seq])[0].token_id for _ in range(6)]
    sampler.release("t")
    assert "t" not in sampler._generators
    again = [sampler(logits, [seq])[0].token_id for _ in range(6)]
    assert first == again
    assert len(set(first)) > 1  # the generator advances between steps


def test_token_counts_ignores_out_of_range_ids():
    counts = token_counts([[1, 1, 3, 9, -1], [], [0]], 4, torch.device("cpu"))
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_penalty_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0], [2.0, -1.0, 0.5, -0.5, 1.0]])
    prompts = [[3], [0]]
    outputs = [[0, 0, 1], [4]]
    presence = torch.tensor([0.5, 0.0])
    frequency = torch.tensor([0.25, -0.5])
    repetition = torch.tensor([2.0, 1.5])
    out = apply_penalties(logits, prompts, outputs, presence, frequency, repetition)
    expected0 = [2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, -0.5 * 2, 1.0]
    expected1 = [2.0 / 1.5, -1.0, 0.5, -0.5, 1.0 / 1.5 + 0.5]
    torch.testing.assert_close(out, torch.tensor([expected0, expected1]))
    # without a repetition penalty the prompt plays no part
    out = apply_penalties(logits, [], outputs, presence, frequency, None)
    expected0 = [2.0 - 0.25 * 2 - 0.5, -1.0 - 0.25 - 0.5, 0.5, -0.5, 1.0]
    expected1 = [2.0, -1.0, 0.5, -0.5, 1.0 + 0.5]
    torch.testing.assert_close(out, torch.tensor([expected0, expected1]))


def test_sampler_applies_penalties_per_row_only():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0]])
    before = logits.clone()
    seqs = [
        make_seq("a", output=[0], temperature=0.0, presence_penalty=0.5),
        make_seq("b", output=[0], temperature=0.0),
        make_seq("c", prompt=[0], temperature=0.0, repetition_penalty=1.2),
    ]
    assert tokens(Sampler()(logits, seqs)) == [1, 0, 1]
    assert torch.equal(logits, before)  # the caller's logits are left alone


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 1.0]] * 4)
    seqs = [
        make_seq("a", temperature=0.0, min_tokens=2, stop_token_ids=[4], output=[5]),
        make_seq("b", temperature=0.0, min_tokens=2, stop_token_ids=[4], output=[5, 5]),
        make_seq("c", temperature=0.0, min_tokens=1, ignore_eos=True, stop_token_ids=[4]),
        make_seq("d", temperature=0.0, stop_token_ids=[4]),
    ]
    assert tokens(Sampler()(logits, seqs)) == [5, 2, 2, 2]
    # sampled rows never draw a masked token either
    drawn = draw_many(
        torch.tensor([0.0, 0.0, 3.0, 0.0, 3.0, 1.0]), 2000, min_tokens=1, stop_token_ids=[4]
    )
    assert not ({2, 4} & set(drawn.tolist()))


def test_logprobs_come_from_the_raw_distribution():
    logits = rand_logits(4, 60, seed=4)
    seqs = [
        make_seq("a", output=[1, 2], temperature=0.8, top_k=10, frequency_penalty=1.0, logprobs=3),
        make_seq("b", temperature=0.0, logprobs=0),
        make_seq("c", temperature=1.0),
        make_seq("d", temperature=0.0, repetition_penalty=2.0, logprobs=20),
    ]
    torch.manual_seed(0)
    res = Sampler()(logits, seqs)
    raw = torch.log_softmax(logits, -1)
    for i in (0, 1, 3):
        assert res[i].logprob == pytest.approx(raw[i, res[i].token_id].item(), abs=1e-6)
    assert res[1].top_logprobs == []
    assert res[2].logprob is None and res[2].top_logprobs is None
    for i, k in ((0, 3), (3, 20)):
        top = res[i].top_logprobs
        assert len(top) == k
        vals = [lp for _, lp in top]
        assert vals == sorted(vals, reverse=True)
        ids = raw[i].topk(k).indices.tolist()
        assert [t for t, _ in top] == ids
        assert all(math.isclose(lp, raw[i, t].item(), abs_tol=1e-6) for t, lp in top)


def test_mixed_batch_shapes_and_ranges():
    v = 300
    logits = rand_logits(6, v, seed=5)
    seqs = [
        make_seq("a", temperature=0.0),
        make_seq("b", temperature=0.7, top_p=0.9),
        make_seq("c", top_k=7, seed=3),
        make_seq("d", min_p=0.05, presence_penalty=1.0, output=[1, 2, 3]),
        make_seq("e", temperature=2.0, top_k=3, top_p=0.5, min_p=0.5, logprobs=2),
        make_seq("f", temperature=1e-6),
    ]
    res = Sampler()(logits, seqs)
    assert len(res) == 6 and all(0 <= r.token_id < v for r in res)
    assert res[0].token_id == logits[0].argmax().item()
    assert res[5].token_id == logits[5].argmax().item()
    assert res[2].token_id in logits[2].topk(7).indices.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seeded_and_greedy():
    dev = torch.device("cuda")
    kw = dict(temperature=0.9, top_k=50, top_p=0.9, seed=42)

    def run(batch_extra: int) -> list[int]:
        sampler = Sampler()
        target = make_seq("t", **kw)
        out = []
        for step in range(8):
            others = [make_seq(f"o{j}", temperature=1.0 + j / 10) for j in range(batch_extra)]
            logits = rand_logits(batch_extra + 1, 1000, seed=step).to(dev)
            logits[-1] = rand_logits(1, 1000, seed=500 + step)[0].to(dev)
            res = sampler(logits, others + [target])
            assert res[-1].token_id < 1000
            target.output_token_ids.append(res[-1].token_id)
            out.append(res[-1].token_id)
        return out

    assert run(0) == run(5) == run(17)
    logits = rand_logits(8, 1000, seed=6).to(dev)
    seqs = [make_seq(f"g{i}", temperature=0.0, logprobs=1) for i in range(8)]
    res = Sampler()(logits, seqs)
    assert tokens(res) == logits.argmax(-1).tolist()
