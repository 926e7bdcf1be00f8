"""Run under torch.distributed.run: greedy tokens of a checkpoint with its decoder sharded
across the ranks (FMS tensor parallelism, gloo on CPU), eager and with a compiled decode
step; rank 0 writes them as JSON to argv[2]."""

import json
import sys

import torch
import torch.distributed as dist

import gsopt
from gsopt.engine.generate import decode_one_token, generate
from gsopt.model.tensor_parallel import load_tensor_parallel

dist.init_process_group("gloo")
folder, out = sys.argv[1], sys.argv[2]
model = load_tensor_parallel(folder, lora="merged")
torch.manual_seed(0)
features = torch.randn(2, 37, 160)
prompts = [
    torch.tensor([5, 6, *[gsopt.model.config.VARIANTS["tiny"].audio_token_id] * 9, 7, 8])
] * 2
with torch.no_grad():
    audio = model.embed_audio(features)
    eager = generate(model, prompts, audio, 12, stop_at_eos=False)
    step = torch.compile(decode_one_token, fullgraph=True)
    compiled = generate(model, prompts, audio, 12, stop_at_eos=False, decode_step=step)
shapes = {
    "qkv": list(model.decoder.base_model.layers[0].attn.in_proj.qkv_fused.weight.shape),
    "cache_kv_heads": model.decoder.base_model.layers[0].attn.kvheads,
}
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"eager": eager.tolist(), "compiled": compiled.tolist(), **shapes}, f)
dist.destroy_process_group()
