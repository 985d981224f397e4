"""Time what cssl demo adds: index_build over the demo's 4 x 1000 frames + one search."""
import os, sys, time, tempfile
from pathlib import Path
import torch
from cssl_core.config import load_params
from cssl_core.data.simulate import simulate_period
from cssl_core.learn.models import Embedder
from pipelines.index import EmbeddingIndex
from pipelines.index_build import build_index

root = Path(tempfile.mkdtemp(prefix="demo-index-"))
os.environ["CSSL_HOME"] = str(root / "home")
params = load_params("params.yaml")
names = params.period_names
for i, p in enumerate(names):
    simulate_period(root / "shards", p, i, len(names), params.simulate, rows_per_group=params.ingest.rows_per_group)
torch.manual_seed(0)
model_dir = Embedder(params.model).save(root / "model")
t0 = time.perf_counter(); c0 = time.process_time()
rep = build_index([root / "shards" / p for p in names], model_dir, 1, root / "index")
t1 = time.perf_counter(); c1 = time.process_time()
idx = EmbeddingIndex(root / "index")
from cssl_core.data.shard import Shard
fid = Shard.open(root / "shards" / names[-1]).read(["frame_id"], split="eval")["frame_id"][0].as_py()
v = idx.stored_vectors(fid)
hits = idx.search(v.vector, 6)
t2 = time.perf_counter()
print(f"frames {rep.rows_total} backbone {params.model.backbone} {params.model.input_size}px threads {torch.get_num_threads()}: build {t1-t0:.1f} s wall, {c1-c0:.1f} s CPU, search {1000*(t2-t1):.0f} ms, load {os.getloadavg()}")
