"""Reference attention backend: gathers pages with torch indexing and runs SDPA. Works on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.server.attention.base import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    """Decodes are batched into one padded SDPA call; prefills run one SDPA call per sequence."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        bs = meta.block_size
        device = meta.slot_mapping.device
        meta.extras["slot_block"] = meta.slot_mapping // bs
        meta.extras["slot_offset"] = meta.slot_mapping % bs
        nd = meta.num_decodes
        if nd:
            # Token positions [nd, max_len] of each decode's context, gathered through its pages.
            max_len = max(meta.seq_lens_cpu[:nd])
            pos = torch.arange(max_len, device=device)
            lens = meta.seq_lens[:nd].long()
            # NOTE: padding positions re-read the last real token (masked out), never a stale slot.
            pos2d = torch.minimum(pos[None, :], lens[:, None] - 1)
            tables = meta.block_tables[:nd].long()
            meta.extras["dec_block"] = tables.gather(1, pos2d // bs)
            meta.extras["dec_offset"] = pos2d % bs
            meta.extras["dec_mask"] = (pos[None, :] < lens[:, None])[:, None, None, :]
        pf = []
        for i in range(nd, meta.num_seqs):
            s = meta.seq_lens_cpu[i]
            pos = torch.arange(s, device=device)
            table = meta.block_tables[i].long()
            pf.append((table[pos // bs], pos % bs))
        meta.extras["pf_index"] = pf

    def forward(self, q, k, v, layer_cache, meta, scale):
        # q: [T, H, D]; k, v: [T, Hkv, D]; layer_cache: [num_blocks, 2, block_size, Hkv, D]
        if "slot_block" not in meta.extras:
            self.prepare(meta)
        ex = meta.extras
        k_cache, v_cache = layer_cache[:, 0], layer_cache[:, 1]
        k_cache[ex["slot_block"], ex["slot_offset"]] = k.to(k_cache.dtype)
        v_cache[ex["slot_block"], ex["slot_offset"]] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        gqa = q.shape[1] != k.shape[1]
        nd = meta.num_decodes
        if nd:
            blk, off = ex["dec_block"], ex["dec_offset"]
            kk = k_cache[blk, off].transpose(1, 2)  # [nd, Hkv, L, D]
            vv = v_cache[blk, off].transpose(1, 2)
            qq = q[:nd].unsqueeze(2)  # [nd, H, 1, D]
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=ex["dec_mask"], scale=scale, enable_gqa=gqa
            )
            out[:nd] = o.squeeze(2)
        qs = meta.query_lens_cpu
        start = nd  # decodes own exactly one row each
        for j, (blk, off) in enumerate(ex["pf_index"]):
            i = nd + j
            ql, sl = qs[i], meta.seq_lens_cpu[i]
            kk = k_cache[blk, off].transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
            vv = v_cache[blk, off].transpose(0, 1).unsqueeze(0)
            qq = q[start : start + ql].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
            if ql == sl:
                o = F.scaled_dot_product_attention(
                    qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa
                )
            else:
                # Causal with an offset: query r sits at position sl - ql + r.
                qpos = torch.arange(sl - ql, sl, device=q.device)
                mask = torch.arange(sl, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(
                    qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa
                )
            out[start : start + ql] = o[0].transpose(0, 1)
            start += ql
        return out
