"""Stop requests: SIGINT/SIGTERM end a run cleanly between steps."""

from __future__ import annotations

import signal

from cast_mlx.errors import EXIT_ERROR, EXIT_SIGNAL

SIGNAL_OF_CODE = {code: name for name, code in EXIT_SIGNAL.items()}


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second SIGINT
    abandons the step at once (the last checkpoint stays valid)."""

    CODES = EXIT_SIGNAL

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal_name is not None and name == "SIGINT":
                raise KeyboardInterrupt
            self.signal_name = name

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

    @property
    def code(self) -> int:
        if self.signal_name is None:
            return EXIT_ERROR
        return self.CODES.get(self.signal_name, EXIT_ERROR)
