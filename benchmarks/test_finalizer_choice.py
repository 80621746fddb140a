"""__del__ or weakref.finalize? The measurement behind the choice (README, "Lifetimes").

create: making N objects that carry a finalizer; fire: dropping them (refcount);
cycles: gc.collect() freeing N objects that each sit in a reference cycle.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from conftest import ROUNDS, scaled
from harness import record

N = scaled(100_000, 20_000, 50)


def noop():
    pass


class WithDel:
    __slots__ = ("me",)

    def __del__(self, _noop=noop):
        _noop()


class WithFinalize:
    __slots__ = ("me", "__weakref__")

    def __init__(self):
        weakref.finalize(self, noop)


class Phase:
    def __init__(self, cls, phase):
        self.cls, self.phase = cls, phase
        self.objs: list = []

    def setup(self):
        self.objs = []
        gc.collect()
        if self.phase != "create":
            self.objs = [self.cls() for _ in range(N)]
            if self.phase == "cycles":
                for o in self.objs:
                    o.me = o  # each object in its own cycle
                self.objs.clear()  # unreachable now: only the collector frees them

    def run(self):
        if self.phase == "create":
            cls = self.cls
            self.objs = [cls() for _ in range(N)]
        elif self.phase == "fire":
            self.objs.clear()
        else:
            gc.collect()

    def cleanup(self):
        self.objs = []
        gc.collect()


@pytest.mark.parametrize("phase", ["create", "fire", "cycles"])
def test_finalizer_choice(benchmark, phase):
    gc.disable()
    try:
        runners = {"__del__": Phase(WithDel, phase), "weakref.finalize": Phase(WithFinalize, phase)}
        record(
            benchmark,
            f"finalizer: {phase}",
            runners,
            N,
            "__del__",
            ROUNDS,
            kind="finalizer",
            unit="object",
        )
    finally:
        gc.enable()
