"""The PEFT side of vs_peft.py, in a process of its own (S-LoRA, arXiv 2311.03285, section 7).

transformers 5 imports the PyPI package `kernels` (transformers.integrations.hub_kernels) when it
is installed, and this project has a kernels.py of its own: in a process whose path holds the
project's directory, `import kernels` finds ours and transformers stops with "cannot import name
'CUDAProperties' from 'kernels'". So vs_peft.py runs transformers and PEFT here, in a child whose
path has the project's directory taken out before anything else is imported; this file imports
nothing of the project.

Protocol: one JSON object per line. The parent writes {"hf_dir", "adapters": {name: dir},
"threads"}; the child answers {"ready": {"transformers", "peft", "kernels"}}, the versions and the
file of the `kernels` module it sees. Then for each {"prompts", "names", "new_tokens"} it answers
{"tokens": [[id, ...], ...], "seconds": time of generate alone}. Standard output carries only these
lines (whatever the libraries print goes to standard error).
Simplified: one client, one request at a time; greedy only (what --vs-peft times).
Demo: started by `python serve.py --vs-peft` (vs_peft.PeftSide); by hand, `python peft_worker.py`
reads the JSON lines above on standard input.
Letters: B batch rows, T0 longest prompt.
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != HERE]


def load(hf_dir: str, adapters: dict):
    """transformers' Llama with every adapter loaded by PEFT under its name."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    (first, path), *rest = adapters.items()
    peft_model = PeftModel.from_pretrained(hf, path, adapter_name=first)
    for name, path in rest:
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model.eval()


def generate(peft_model, prompts: list, names: list, new_tokens: int) -> list:
    """PEFT's mixed-adapter batch: prompts left-padded to the longest, adapter_names per row."""
    import torch
    T0 = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts])                     # [B, T0]
    mask = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
    return out[:, T0:].tolist()


def versions() -> dict:
    """What this process imported: the answer to the parent's first line."""
    import peft
    import transformers
    kernels = sys.modules.get("kernels")
    return {"transformers": transformers.__version__, "peft": peft.__version__,
            "kernels": getattr(kernels, "__file__", None)}


def serve(inp, out):
    """Answer the parent's lines until it closes standard input."""
    setup = json.loads(inp.readline())
    import torch
    torch.set_num_threads(setup["threads"])
    adapters = setup["adapters"]                                   # none: the versions only
    model = load(setup["hf_dir"], adapters) if adapters else None
    out.write(json.dumps({"ready": versions()}) + "\n")
    out.flush()
    for line in inp:
        job = json.loads(line)
        start = time.perf_counter()
        tokens = generate(model, job["prompts"], job["names"], job["new_tokens"])
        out.write(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}) + "\n")
        out.flush()


if __name__ == "__main__":
    protocol, sys.stdout = sys.stdout, sys.stderr
    serve(sys.stdin, protocol)
