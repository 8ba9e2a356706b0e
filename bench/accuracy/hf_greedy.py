"""Greedy continuations with HF transformers (f32, the GGUF's weights dequantised by
transformers' own GGUF loader) from given token ids, for bench/accuracy/run.sh.

    python hf_greedy.py MODEL.gguf IN.json OUT.json   (IN.json from the `greedy` example)
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

model_path, inp, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(
    model_path.parent, gguf_file=model_path.name, torch_dtype=torch.float32
).eval()
data = json.load(open(inp))
steps = len(data["fast"][0])
generated = []
with torch.no_grad():
    for ids in data["prompts"]:
        x = torch.tensor([ids])
        o = model(x, use_cache=True)
        past, toks = o.past_key_values, []
        for _ in range(steps):
            t = int(o.logits[0, -1].argmax())
            toks.append(t)
            o = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
        generated.append(toks)
        print(f"{len(generated)}/{len(data['prompts'])}", file=sys.stderr, flush=True)
json.dump({"hf": generated}, open(out, "w"))
