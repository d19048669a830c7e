"""Decode attention on a region, executed functionally against a plain numpy layer."""

import numpy as np
import pytest

from compiler.algorithms.attention import attention_block, head_layout, kv_positions, pack_cache
from compiler.algorithms.common import Region, split
from compiler.program import INPUT, OUTPUT, ProgramBuilder, ProgramError
from wafersim.functional import execute


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, cs, hd):  # x [..., hd], Hugging Face's rotate_half
    c, s_ = np.concatenate([cs[0], cs[0]]), np.concatenate([cs[1], cs[1]])
    x1, x2 = x[..., :hd//2], x[..., hd//2:]
    return x * c + np.concatenate([-x2, x1], -1) * s_

def _run(R, C, b=1, ctx=5, slots=4, d=64, H=4, KV=2, hd=16, bias=False):
    rng = np.random.default_rng(0)
    g = H // KV
    W = {n: rng.normal(size=sh).astype(np.float32) / np.sqrt(sh[0]) for n, sh in
         dict(q=(d, H*hd), k=(d, KV*hd), v=(d, KV*hd), o=(H*hd, d)).items()}
    nw = (1 + 0.1*rng.normal(size=(1, d))).astype(np.float32)
    h = rng.normal(size=(b, d)).astype(np.float32)
    Kc = rng.normal(size=(b, ctx, KV*hd)).astype(np.float32)
    Vc = rng.normal(size=(b, ctx, KV*hd)).astype(np.float32)
    angle = ctx * 10000.0 ** (-np.arange(hd // 2) * 2 / hd)
    cs = np.stack([np.cos(angle), np.sin(angle)]).astype(np.float32)
    # reference
    x = rms(h, nw, 1e-5)
    q = rope((x @ W["q"]).reshape(b, H, hd), cs, hd)
    k = rope((x @ W["k"]).reshape(b, KV, hd), cs, hd)
    v = (x @ W["v"]).reshape(b, KV, hd)
    K = np.concatenate([Kc.reshape(b, ctx, KV, hd), k[:, None]], 1)
    V = np.concatenate([Vc.reshape(b, ctx, KV, hd), v[:, None]], 1)
    out = np.zeros((b, H, hd))
    for s in range(b):
        for hh in range(H):
            sc = K[s, :, hh//g] @ q[s, hh] / np.sqrt(hd)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            out[s, hh] = p @ V[s, :, hh//g]
    ref = h + out.reshape(b, H*hd) @ W["o"]
    # wafer
    bld = ProgramBuilder(C, R, "fp32")
    grid = Region(R, C).cores(C)
    c0, cs_ = split(d, C)
    cj = np.broadcast_to(np.arange(C)[None], grid.shape)
    th = bld.tensor("h", b, d)
    hb = bld.buffers(grid.ravel(), b, cs_[cj].ravel(), INPUT, th, 0, c0[cj].ravel())
    res, _ = attention_block(bld, Region(R, C), hb.reshape(grid.shape), b, d, H, KV, hd, "L",
                             ctx=ctx, slots=slots, eps=1e-5)
    to = bld.tensor("out", b, d)
    bld.mark(res.ravel(), OUTPUT, to, 0, c0[cj].ravel())
    prog = bld.build()
    lay = head_layout(R, KV, g, hd)
    kc, vc = pack_cache(lay, Kc, Vc, C, slots)
    ins = {"h": h, "L.attn_norm": nw, "L.q": W["q"][:, lay.order(g, True)],
           "L.k": W["k"][:, lay.order(1, True)], "L.v": W["v"][:, lay.order(1, False)],
           "L.o": W["o"][lay.order(g, False)], "rope": cs,
           "L.k_cache": kc, "L.v_cache": vc}
    got = execute(prog, ins)
    err = np.abs(got["out"] - ref).max()
    # the cache after the step holds ctx+1 tokens at the shift positions
    kc2, vc2 = pack_cache(lay, K.reshape(b, ctx+1, -1), V.reshape(b, ctx+1, -1), C, slots)
    cerr = max(np.abs(got["L.k_cache"] - kc2).max(), np.abs(got["L.v_cache"] - vc2).max())
    return err, cerr



@pytest.mark.parametrize("rows,cols,b,ctx,slots", [
    (4, 4, 1, 5, 4),  # two rows per KV head
    (4, 4, 2, 7, 4),  # batch
    (1, 4, 1, 3, 4),  # both KV heads on one row
    (3, 5, 1, 9, 2),  # uneven row groups, the cache's last slot
    (8, 2, 1, 2, 2),  # one RoPE pair per row
])
def test_attention_block_matches_numpy(rows, cols, b, ctx, slots):
    err, cache_err = _run(rows, cols, b=b, ctx=ctx, slots=slots)
    assert err < 1e-5 and cache_err < 1e-5


def test_kv_positions_are_balanced():
    for t, cols in ((0, 3), (7, 3), (12, 4), (13, 5)):
        col, slot = kv_positions(t, cols)
        counts = np.bincount(col, minlength=cols)
        assert counts.max() - counts.min() <= 1
        assert len(set(zip(col, slot))) == t  # one token per slot


def test_too_many_rows_for_the_heads_is_refused():
    with pytest.raises(ProgramError, match="RoPE pair"):
        head_layout(20, 2, 2, 16)
