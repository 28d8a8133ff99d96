"""A reward plug-in for cast-mlx: TRL's reward-function convention, one value per completion.

`reward.functions: [math, examples/own-task/brevity.py:brevity]` adds it to the verifier's
0/1 reward (weights in `reward.weights`). Here: up to 0.2 for an answer that stops early.
"""


def brevity(completions, *, lengths, truncated, **kwargs):
    """0.2 for a completion of at most 16 tokens, falling to 0 at 64; 0 when cut off."""
    out = []
    for n, cut in zip(lengths, truncated):
        out.append(0.0 if cut else 0.2 * min(1.0, max(0.0, (64 - n) / 48)))
    return out
