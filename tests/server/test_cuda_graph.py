"""Decode CUDA graphs: the bucket rules everywhere, and on a GPU, replays equal to eager steps."""

from __future__ import annotations

import pytest

from baton import SamplingParams
from baton.server.config import EngineConfig
from baton.server.cuda_graph import MAX_CAPTURE_SIZE, bucket_for, capture_sizes
from baton.server.engine import LLMEngine


def test_capture_sizes_cover_the_batch_limit():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 32]
    sizes = capture_sizes(10_000)
    assert sizes[-1] == MAX_CAPTURE_SIZE and sizes == sorted(set(sizes))
    assert all(b - a <= 16 for a, b in zip(sizes, sizes[1:], strict=False))


def test_bucket_is_the_smallest_that_holds_the_batch():
    sizes = capture_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 9, 16, 17, 64)] == [1, 4, 8, 16, 16, 32, 64]
    assert bucket_for(65, sizes) is None


@pytest.mark.gpu
def test_graph_replays_equal_eager_steps(tiny_config_dir):
    """Batches of 1..5 decodes (padded to buckets 1, 2, 4, 8) give the eager engine's tokens."""

    def run(cuda_graphs: bool) -> list[list[int]]:
        eng = LLMEngine(
            EngineConfig(
                model=tiny_config_dir,
                load_format="dummy",
                device="cuda",
                dtype="float16",
                seed=0,
                show_progress=False,
                cuda_graphs=cuda_graphs,
                max_num_seqs=8,
                num_kv_blocks=64,  # two engines in one process: no budget from free memory
            )
        )
        assert (eng.runner.graphs is not None) == cuda_graphs
        out = {}
        for i in range(5):
            p = SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True)
            eng.add_request(str(i), [3 + i + j for j in range(5 + 7 * i)], p)
        while eng.has_unfinished_requests():
            for o in eng.step():
                out[o.request_id] = o.outputs[0].token_ids
        return [out[str(i)] for i in range(5)]

    assert run(True) == run(False)
