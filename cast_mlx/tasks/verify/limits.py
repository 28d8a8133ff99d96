"""Size limits of the verifier. They keep every step polynomial in a small input; the
`TimeoutPool` wall-clock limit is the net behind them.

A leaf module (no imports) so that extraction, normalisation and the parser can all read
the same numbers; the package re-exports them.
"""

MAX_ANSWER_CHARS = 1000  # a longer extracted answer is compared as a string only
EXTRACT_TAIL_CHARS = 20_000  # the last number is searched in this tail of a completion
MAX_TOKENS = 400  # tokens of one answer the parser accepts
MAX_DEPTH = 40  # nesting of brackets / \frac / \sqrt groups
MAX_NODES = 400  # nodes of a built sympy tree
MAX_EXPONENT = 1000  # |n| of a numeric exponent
MAX_SYMBOLIC_EXPONENT = 64  # |n| of an integer exponent on a non-numeric base
MAX_RESULT_DIGITS = 300  # digits of a number literal or an exact power like 2^900
MAX_FACTORIAL = 300
