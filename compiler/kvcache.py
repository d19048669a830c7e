"""How long a decode the KV cache allows: WaferLLM's shift-based cache against concatenation.

A sequence's cache is spread over a line of `cores` positions (compiler.algorithms.attention:
the region's columns), each able to hold `per_core` tokens: the cache slots the busiest core's
free SRAM allows (the compiler's figure). A prompt of `prompt` tokens is laid out evenly by
prefill (the last position holds prompt // cores); then decode adds one token per step:

- `shift` (WaferLLM): entries shift along the line as each token arrives, so every position
  fills evenly and the line holds cores x per_core tokens;
- `concat` (PagedAttention-style concatenation): each new token is appended on the core holding
  the tail, so the tail core fills while the others keep their share of the prompt; the cache
  is full when the tail core overflows: prompt + per_core - prompt // cores tokens.

Both functions are closed form; the whole-model compiler (compile_model's memory report) and
`wafersim layer` use them with their own cores and per_core.
"""

from __future__ import annotations

KV_KINDS = ("shift", "concat")


def max_tokens(kind: str, cores: int, per_core: int, prompt: int = 0) -> int:
    """The most tokens the cache holds (prompt included); 0 when the prompt does not fit.

    >>> max_tokens("shift", 4, 10, prompt=8), max_tokens("concat", 4, 10, prompt=8)
    (40, 16)
    """
    if kind not in KV_KINDS:
        raise ValueError(f"kv cache {kind!r} is not one of {', '.join(KV_KINDS)}")
    if cores < 1 or prompt < 0:
        raise ValueError(f"kv cache: cores={cores} must be >= 1 and prompt={prompt} >= 0")
    per_core = max(per_core, 0)
    if -(-prompt // cores) > per_core:  # the prompt's share overflows a core already
        return 0
    if kind == "shift":
        return cores * per_core
    return prompt + per_core - prompt // cores


def max_decode(kind: str, cores: int, per_core: int, prompt: int = 0) -> int:
    """Decode steps (new tokens) that fit after the prompt.

    >>> max_decode("shift", 4, 10, prompt=8), max_decode("concat", 4, 10, prompt=8)
    (32, 8)
    """
    return max(0, max_tokens(kind, cores, per_core, prompt) - prompt)


def report(cores: int, per_core: int, prompt: int) -> dict:
    """Both caches' figures, as the compile report and `wafersim layer` print them."""
    out = dict(kv_tokens_per_core=int(max(per_core, 0)), kv_cores_per_line=int(cores))
    for kind in KV_KINDS:
        out[f"max_tokens_{kind}"] = max_tokens(kind, cores, per_core, prompt)
        out[f"max_decode_{kind}"] = max_decode(kind, cores, per_core, prompt)
    return out
