"""Tokens before the first divergence from HF transformers' greedy tokens, per engine, summed over
the prompts: `python3 score.py GREEDY.json HF.json LLAMA.txt|- [OUT.json]` (see run.sh; `-` leaves
llama.cpp out)."""

import json
import sys

ours = json.load(open(sys.argv[1]))
hf = json.load(open(sys.argv[2]))["hf"]
engines = {f"gristmill {k}": v for k, v in ours.items() if k not in ("model", "prompts")}
if sys.argv[3] != "-":
    engines["llama.cpp"] = [[int(t) for t in line.split()] for line in open(sys.argv[3]) if line.strip()]


def agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


total = sum(len(h) for h in hf)
result = {"prompts": len(hf), "tokens_per_prompt": len(hf[0]), "agreement": {}}
print(f"{len(hf)} prompts × {len(hf[0])} greedy tokens; tokens equal to HF's before the first divergence:")
for name, gen in engines.items():
    assert len(gen) == len(hf), f"{name}: {len(gen)} continuations for {len(hf)} prompts"
    per = [agree(g, h) for g, h in zip(gen, hf)]
    result["agreement"][name] = {"total": sum(per), "per_prompt": per}
    print(f"  {name:22} {sum(per):4} of {total}  {per}")
if len(sys.argv) > 4:
    json.dump(result, open(sys.argv[4], "w"), indent=1)
