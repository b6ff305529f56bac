"""A clock the tests move by hand (the broker takes ``monotonic()`` and ``wall()``)."""


class FakeClock:
    def __init__(self, mono: float = 1000.0, wall: float = 1_700_000_000.0):
        self.mono = mono
        self.wall_time = wall

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_time

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_time += seconds
