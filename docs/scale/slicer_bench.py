"""Samples/s of the vectorised batch slicer (Split.batch on CPU) over a prepared folder, random batches."""
import sys, time
import numpy as np, torch
from training.train import load_prepared
torch.set_num_threads(1)
data = load_prepared(sys.argv[1])
rng = np.random.default_rng(0)
for b in (128, 2048):
    n = 0; t0 = time.perf_counter()
    while time.perf_counter() - t0 < 5:
        rows = rng.integers(0, data.train.rows, b)
        data.train.batch(rows, torch.device("cpu")); data.train.labels(rows); n += b
    print(f"batch {b}: {n / (time.perf_counter() - t0):,.0f} samples/s (one thread, load {open('/proc/loadavg').read().split()[0]})")
