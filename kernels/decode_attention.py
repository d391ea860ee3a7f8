"""Split-K decode attention (Flash-Decoding) over an fp16 cache, in Triton.

Stage 1, grid (batch, KV head, split): the G query heads that share a KV head form one tile
[G padded to 16, D] so the score and output products run on tensor cores (tl.dot); the split's
tokens stream through in BLOCK_N blocks with an fp32 online softmax; each split writes its partial
output and log-sum-exp. Stage 2 merges the splits. Splits have a fixed token length, so a single
long sequence still fills every SM. Only each sequence's valid length is read.
The plain-torch reference is engine.cache.attention.
"""
import torch
import triton
import triton.language as tl

SPLIT_TOKENS = 1024  # tokens per split: 1M tokens -> 1024 splits per (sequence, KV head)
BLOCK_N = 64         # tokens per inner step: [64, D] fp16 K and V tiles stay in registers / smem


@triton.jit
def _decode_stage1(q_ptr, k_ptr, v_ptr, lengths_ptr, out_ptr, lse_ptr,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                   scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + b)
    start = split * SPLIT
    rows = tl.arange(0, G_PAD)                       # query heads of this KV head, padded
    cols = tl.arange(0, D)
    heads = kv_head * G + rows
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
                mask=rows[:, None] < G, other=0.0)   # (G_PAD, D)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    end = tl.minimum(start + SPLIT, length)
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        valid = tokens < end
        offsets = b * stride_kb + kv_head * stride_kh + tokens[:, None] * stride_kt + cols[None, :]
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)         # (BLOCK_N, D)
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale                                     # (G_PAD, BLOCK_N) fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    # An empty split (past this sequence's end) leaves l = 0: its lse is -inf and stage 2 drops it.
    has_tokens = l > 0
    l = tl.where(has_tokens, l, 1.0)
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + cols[None, :],
             out, mask=rows[:, None] < G)
    lse = tl.where(has_tokens, m + tl.log(l), float("-inf"))
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=rows < G)


def merge_splits(partial_out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Stage 2: partial_out [B, H, S, D] fp32, lse [B, H, S] -> [B, H, D], each split weighted by
    its share of the softmax mass. Also merges the sinks and the window as further splits."""
    weights = torch.softmax(lse, dim=-1)                                       # (B, H, S)
    return (weights[..., None] * partial_out).sum(-2)


def decode_attention_fp16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                          split_tokens: int = SPLIT_TOKENS) -> torch.Tensor:
    """q [B, H, D] one query per sequence; k, v [B, Hkv, T_cap, D] with sequence b's keys at
    positions 0..lengths[b]-1. Returns [B, H, D] in q's dtype."""
    B, H, D = q.shape
    Hkv, capacity = k.shape[1], k.shape[2]
    G = H // Hkv
    n_splits = triton.cdiv(capacity, split_tokens)
    partial_out = torch.empty(B, H, n_splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, n_splits, device=q.device, dtype=torch.float32)
    _decode_stage1[(B, Hkv, n_splits)](
        q, k, v, lengths, partial_out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), lse.stride(0), lse.stride(1),
        D ** -0.5, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, SPLIT=split_tokens,
        BLOCK_N=min(BLOCK_N, split_tokens))
    return merge_splits(partial_out, lse).to(q.dtype)
