"""Attention through the Triton kernels: K/V stored by slot, decodes with split-KV flash-decoding,
prefills (with or without a cached prefix) with the extend kernel. The default on CUDA.

On CPU it runs only under the Triton interpreter (for tests); `get_attention_backend` says so.
"""

from __future__ import annotations

import torch

from baton.kernels.decode_attention import choose_num_splits, decode_attention
from baton.kernels.extend_attention import extend_attention
from baton.kernels.store_kv import store_kv
from baton.kernels.utils import num_sms
from baton.server.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step facts every layer shares: the split count of the decodes, the prefills'
        own query offsets and their longest query. Host values only; no device sync.

        A caller that fixes `extras["num_splits"]` beforehand (a captured CUDA graph, whose
        launches cannot change) keeps it.
        """
        ex = meta.extras
        nd, n = meta.num_decodes, meta.num_seqs
        if nd and "num_splits" not in ex:
            device = meta.seq_lens.device
            longest = max(meta.seq_lens_cpu[:nd])
            # NOTE: the KV head count is only known per layer; splits are chosen per KV head
            # in forward from this host-side hint, the same for every layer.
            ex["decode_max_len"] = longest
            ex["sms"] = num_sms(device)
        if nd < n:
            qsl = meta.query_start_loc[nd:]
            ex["prefill_qsl"] = qsl - qsl[0]
            ex["prefill_max_q"] = max(meta.query_lens_cpu[nd:])
        ex["prepared"] = True

    def _num_splits(self, meta: AttentionMetadata, num_kv_heads: int) -> int:
        ex = meta.extras
        if "num_splits" not in ex:
            ex["num_splits"] = choose_num_splits(
                meta.num_decodes, num_kv_heads, ex["decode_max_len"], meta.block_size, ex["sms"]
            )
        return ex["num_splits"]

    def forward(self, q, k, v, layer_cache, meta, scale):
        # q: [T, H, D]; k, v: [T, Hkv, D]; layer_cache: [num_blocks, 2, block_size, Hkv, D]
        if "prepared" not in meta.extras:
            self.prepare(meta)
        ex = meta.extras
        k_cache, v_cache = layer_cache[:, 0], layer_cache[:, 1]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd, n = meta.num_decodes, meta.num_seqs
        if nd:
            decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                scale,
                num_splits=self._num_splits(meta, k.shape[1]),
                out=out[:nd],
            )
        if nd < n:
            extend_attention(
                q[nd:],
                k[nd:],
                v[nd:],
                k_cache,
                v_cache,
                meta.block_tables[nd:],
                ex["prefill_qsl"],
                meta.seq_lens[nd:],
                ex["prefill_max_q"],
                scale,
                out=out[nd:],
            )
        return out
