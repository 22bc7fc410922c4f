"""Reference attention backend: gathers cached tokens with torch indexing, then plain matmuls or
SDPA. Works on CPU and is the ground truth for the Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.server.attention.base import AttentionBackend, AttentionMetadata


def _token_rows(layer_cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A [rows, Hkv, D] view of the cache in which token `o` of block `b` is row `b * step + o`
    for K and `b * step + block_size + o` for V; returns (view, step).

    NOTE: the layer view is strided (blocks hold every layer); rows of one layer are still
    evenly spaced, so one flat view lets index_select/index_copy_ move whole rows at once.
    """
    nb, two, bs, hkv, d = layer_cache.shape
    row = hkv * d
    if two != 2 or layer_cache.stride()[1:] != (bs * row, row, d, 1):
        raise ValueError("layer_cache must be a [num_blocks, 2, block_size, Hkv, D] block view")
    step = layer_cache.stride(0) // row
    flat = layer_cache.as_strided(((nb - 1) * step + 2 * bs, hkv, d), (row, d, 1))
    return flat, step


def _value_bags(
    v_rows: torch.Tensor, nd: int, hkv: int, group: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's V rows (its KV head's, repeated for the heads of a group) and where
    each head's bag starts: the indices and offsets of an embedding_bag."""
    rows = v_rows.view(nd, hkv, 1, length).expand(nd, hkv, group, length).reshape(-1)
    return rows, torch.arange(0, rows.numel(), length, device=rows.device)


class TorchAttentionBackend(AttentionBackend):
    """Decodes are batched into grouped matmuls; prefills run one SDPA call per sequence."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step indices shared by every layer (positions as block-relative token rows)."""
        bs = meta.block_size
        device = meta.slot_mapping.device
        tables = meta.block_tables.long()
        slots = meta.slot_mapping
        # Block index and offset of each new token; rows need the layer's step, known in forward.
        meta.extras["new"] = (slots // bs, slots % bs)
        nd = meta.num_decodes
        if nd:
            max_len = max(meta.seq_lens_cpu[:nd])
            pos = torch.arange(max_len, device=device)
            lens = meta.seq_lens[:nd].long()
            # NOTE: padding re-reads the last real token (then masked out), never a stale slot.
            pos2d = torch.minimum(pos[None, :], lens[:, None] - 1)
            blk = tables[:nd].gather(1, pos2d // bs)
            meta.extras["dec"] = (blk, pos2d % bs)
            bias = torch.zeros(nd, max_len, device=device)
            bias.masked_fill_(pos[None, :] >= lens[:, None], float("-inf"))
            meta.extras["dec_bias"] = bias[:, None, None, :]  # [nd, 1, 1, L]
        pf = []
        for i in range(nd, meta.num_seqs):
            pos = torch.arange(meta.seq_lens_cpu[i], device=device)
            pf.append((tables[i][pos // bs], pos % bs))
        meta.extras["pf"] = pf

    def forward(self, q, k, v, layer_cache, meta, scale):
        # q: [T, H, D]; k, v: [T, Hkv, D]; layer_cache: [num_blocks, 2, block_size, Hkv, D]
        if "new" not in meta.extras:
            self.prepare(meta)
        ex = meta.extras
        bs = meta.block_size
        flat, step = _token_rows(layer_cache)
        blk, off = ex["new"]
        k_rows = blk * step + off
        flat.index_copy_(0, k_rows, k.to(flat.dtype))
        flat.index_copy_(0, k_rows + bs, v.to(flat.dtype))
        out = torch.empty_like(q)
        h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        nd = meta.num_decodes
        if nd:
            # Gather each decode's context per KV head, [nd, Hkv, L, D], ready for batched matmuls.
            rows = ex.get(("dec_rows", step))
            if rows is None:
                blk, off = ex["dec"]
                tok = (blk * step + off)[:, None, :] * hkv  # [nd, 1, L]
                rows = (tok + torch.arange(hkv, device=tok.device)[None, :, None]).reshape(-1)
                ex[("dec_rows", step)] = rows
            length = ex["dec"][0].shape[1]
            head_rows = flat.view(-1, d)  # one row per (token slot, KV head)
            kk = head_rows.index_select(0, rows).view(nd, hkv, length, d)
            # The query heads sharing a KV head attend together: [nd, Hkv, G, D].
            qq = q[:nd].reshape(nd, hkv, h // hkv, d).to(flat.dtype)
            scores = torch.matmul(qq, kk.transpose(2, 3)).float() * scale + ex["dec_bias"]
            probs = scores.softmax(-1).to(flat.dtype)
            # NOTE: P @ V as a weighted sum of V's rows where they lie in the cache (one bag per
            # query head): gathering V first and multiplying read and wrote it twice more, ~40%
            # of a decode step's attention at 64 sequences of 200 tokens.
            v_rows, bags = ex.get(("dec_v", step)) or ex.setdefault(
                ("dec_v", step), _value_bags(rows + bs * hkv, nd, hkv, h // hkv, length)
            )
            pv = F.embedding_bag(
                v_rows, head_rows, bags, mode="sum", per_sample_weights=probs.reshape(-1)
            )
            out[:nd] = pv.view(nd, h, d).to(q.dtype)
        qs = meta.query_lens_cpu
        start = nd  # decodes own exactly one row each
        gqa = h != hkv
        for j, (pblk, poff) in enumerate(ex["pf"]):
            i = nd + j
            ql, sl = qs[i], meta.seq_lens_cpu[i]
            rows = pblk * step + poff
            kk = flat.index_select(0, rows).transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
            vv = flat.index_select(0, rows + bs).transpose(0, 1).unsqueeze(0)
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
