"""CPU time, kernel time and page faults per training step (`training.train.train_step`, random batches of 128, one
thread, after 3 warm-up steps) with dense or sparse embedding gradients; appends one JSON line to OUT.
usage: python docs/scale/dense_step.py DIR OUT [--sparse-embeddings]"""
import json, resource, sys, time
import numpy as np, torch
from torch import nn
from training.memory import keep_step_memory_mapped
from training.model import build_model
from training.train import TrainOptions, build_configs, build_optimizers, load_prepared, seed_everything, train_step

torch.set_num_threads(1)
keep_step_memory_mapped()  # as train() does
folder, out, sparse = sys.argv[1], sys.argv[2], "--sparse-embeddings" in sys.argv
data = load_prepared(folder)
options = TrainOptions(sparse_embeddings=sparse)
seed_everything(0)
model = build_model(build_configs(options, data).model)
optimizers, loss_fn, rng, cpu = build_optimizers(model, options), nn.BCEWithLogitsLoss(), np.random.default_rng(0), torch.device("cpu")
steps = 8
for _ in range(3):
    train_step(model, optimizers, loss_fn, data.train, rng.integers(0, data.train.rows, 128), cpu, options)
u0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
    train_step(model, optimizers, loss_fn, data.train, rng.integers(0, data.train.rows, 128), cpu, options)
u1 = resource.getrusage(resource.RUSAGE_SELF)
result = {"data": folder, "sparse_embeddings": sparse, "steps": steps,
          "cpu_s_per_step": (u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime) / steps,
          "kernel_s_per_step": (u1.ru_stime - u0.ru_stime) / steps, "minor_faults_per_step": (u1.ru_minflt - u0.ru_minflt) / steps}
with open(out, "a") as f:
    f.write(json.dumps(result) + "\n")
print(result)
