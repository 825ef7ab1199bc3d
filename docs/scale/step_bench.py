"""Training steps fed by the old layout (in-RAM [S, L] history arrays, rows gathered per batch, as the previous
trainer did) vs the new one (Split.batch: histories sliced from the memory-mapped sequences), alternating blocks of
steps in one process; CPU seconds per path (time.process_time), so other jobs on the machine matter less."""
import sys, time
import numpy as np, torch
from torch import nn
from training.train import TrainOptions, load_prepared, build_configs, build_optimizers, seed_everything
from training.model import build_model

torch.set_num_threads(1)
new_dir, old_dir, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = load_prepared(new_dir)
with np.load(f"{old_dir}/train.npz") as z:
    old = {k: z[k] for k in ("hist_item", "hist_cate", "cand_item", "cand_cate", "label")}
opts = TrainOptions(sparse_embeddings="--sparse" in sys.argv)
seed_everything(0)
model = build_model(build_configs(opts, data).model)
optims = build_optimizers(model, opts)
loss_fn = nn.BCEWithLogitsLoss()
rng = np.random.default_rng(0)
dev = torch.device("cpu")

def old_batch(rows):
    t = tuple(torch.from_numpy(old[k][rows]).to(dev) for k in ("hist_item", "hist_cate", "cand_item", "cand_cate"))
    return t, torch.from_numpy(old["label"][rows])

def new_batch(rows):
    return data.train.batch(rows, dev), torch.from_numpy(data.train.labels(rows))

def step(batch):
    (hi, hc, ci, cc), label = batch
    model.train()
    logits, aux = model(hi, hc, ci, cc, with_aux=True)
    loss = loss_fn(logits, label) + loss_fn(aux, label)
    for o in optims: o.zero_grad(set_to_none=True)
    loss.backward()
    for o in optims: o.step()

cpu = {"old": 0.0, "new": 0.0}; n = {"old": 0, "new": 0}
for b in range(blocks):
    for who, make in (("old", old_batch), ("new", new_batch)) if b % 2 == 0 else (("new", new_batch), ("old", old_batch)):
        t0 = time.process_time()
        for _ in range(20):
            rows = rng.integers(0, data.train.rows, 128)
            step(make(rows)); n[who] += 128
        cpu[who] += time.process_time() - t0
for who in ("old", "new"):
    print(f"{who}: {n[who]} samples, {cpu[who]:.1f} CPU s, {n[who] / cpu[who]:,.0f} samples per CPU-second")
