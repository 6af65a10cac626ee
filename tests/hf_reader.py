"""What a consumer of an exported Hugging Face directory sees, under whichever transformers runs it.

`read(request)` loads `request["hf_dir"]` with `AutoModelForCausalLM` / `AutoTokenizer` and returns
the model class, the rotary inverse frequencies the model built, fp32 logits for
`request["tokens"]`, and the token ids of `request["texts"]` and the rendered `request["chat"]`.
It imports nothing from nemo_minitron, so it is an independent reader: tests call it in-process
(transformers 5) and run this file as a script in the transformers 4.57 venv of scripts/compat.sh:

    python tests/hf_reader.py REQUESTS.json RESULTS.pt      # a list of requests -> a list of results
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import transformers


def read(request: dict[str, Any]) -> dict[str, Any]:
    hf_dir = request["hf_dir"]
    result: dict[str, Any] = {"transformers": transformers.__version__}
    if request.get("tokens") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            result["logits"] = model(torch.tensor(request["tokens"])).logits
        result["model_class"] = type(model).__name__
        result["inv_freq"] = model.model.rotary_emb.inv_freq.clone()
    if request.get("texts") is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        result["tokenizer_class"] = type(tokenizer).__name__
        result["ids"] = [tokenizer(text)["input_ids"] for text in request["texts"]]
        result["special"] = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "vocab": len(tokenizer)}
        if request.get("chat") is not None:
            result["chat"] = tokenizer.apply_chat_template(request["chat"], tokenize=False, add_generation_prompt=True)
    return result


if __name__ == "__main__":
    requests_file, results_file = sys.argv[1:]
    with open(requests_file) as f:
        requests = json.load(f)
    torch.save([read(r) for r in requests], results_file)
