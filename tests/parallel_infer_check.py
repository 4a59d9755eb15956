"""Run under torchrun by test_serve_parallel.py: load a model directory split over the job's ranks and write
what the test compares with one process (logits of a full forward, of absorbed decoding over a cache, of the
MTP module) and each rank's resident bytes, as JSON from rank 0."""

import json
import sys

import torch
import torch.distributed as dist

from dsv3.checkpoint import load_pretrained
from dsv3.model.cache import new_cache
from dsv3.parallel import inference, serving

directory, out = sys.argv[1], sys.argv[2]
serving.init()
torch.set_num_threads(1)
model = load_pretrained(directory, "fp32", shard=inference.shard)
torch.manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (2, 24))
with torch.inference_mode():
    full = model.run(ids, mtp=True)
    cache = new_cache(model.config, 2, 32, "fp32")
    model.run(ids[:, :16], cache=cache)
    step = model.run(ids[:, 16:], torch.arange(16, 24).expand(2, 8), cache, attn="absorb").logits
held = torch.tensor([inference.local_bytes(model)])
sizes = [torch.zeros_like(held) for _ in range(dist.get_world_size())]
dist.all_gather(sizes, held)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"logits": full.logits.tolist(), "mtp": full.mtp_logits[0].tolist(), "decode": step.tolist(),
                   "bytes": [int(s) for s in sizes]}, f)
dist.destroy_process_group()
