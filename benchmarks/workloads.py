"""Workloads shared by the benchmarks and by the tests that check what the
benchmarks measure (the tests load this file with ``runpy``)."""

#: The checkpoint issue's workload: the 12 kinds of values, set up in one
#: cell. The cell reads ``DATA_FILE`` (the path of a text file of a few lines),
#: which the caller defines first.
CHECKPOINT = """
import threading
import numpy as np
import pandas as pd
import math as m

arr = np.random.default_rng(0).random(1_000_000)
n = 100_000
rng = np.random.default_rng(1)
df = pd.DataFrame({
    "i": np.arange(n, dtype=np.int64),
    "f": rng.random(n),
    "s": [f"s{i % 997}" for i in range(n)],
    "b": np.arange(n) % 3 == 0,
    "t": pd.date_range("2024-01-01", periods=n, freq="s"),
})
d = {f"k{i}": (i, i / 7, f"v{i}") for i in range(10_000)}
scale = 2

def f(x):
    return x * scale

lam = lambda x: x + 1

def make_adder(k):
    def add(x):
        return x + k
    return add

adder = make_adder(10)

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm(self):
        return m.hypot(self.x, self.y)

points = [Point(i, 2 * i) for i in range(1000)]
gen = (i * i for i in range(10))
next(gen), next(gen)
lock = threading.Lock()
fh = open(DATA_FILE)
fh.readline()
del n, rng
"""
