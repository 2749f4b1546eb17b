"""The test suite: CPU only, minutes not hours. `python -m pytest -q test_all.py`.

Tests that need the real model or the E2E data read LORA_MODEL_PATH and E2E_DATA (set by .ci/run
to local copies) and are skipped with a reason elsewhere. Triton kernels run on the CPU through
TRITON_INTERPRET=1, set here before triton is imported (triton.jit reads it at import).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import zipfile  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import attention  # noqa: E402
import kernel_bench  # noqa: E402
import kernels  # noqa: E402
import kernels_train  # noqa: E402
import int8_bench  # noqa: E402
import lora  # noqa: E402
import checkpoints as C  # noqa: E402
import tokenizer as tok_mod  # noqa: E402
import e2e  # noqa: E402
import model as M  # noqa: E402
import adapters  # noqa: E402
import engine as E  # noqa: E402
import baselines as B  # noqa: E402
import serve  # noqa: E402
import http_bench  # noqa: E402
import tp  # noqa: E402
import vs_peft  # noqa: E402
import multi_train  # noqa: E402
import pool_view  # noqa: E402
import train  # noqa: E402
import trainer  # noqa: E402
import decode  # noqa: E402
import sft_data  # noqa: E402
from lora import AdapterError, LoRAConfig, read_adapter  # noqa: E402
from lora import load_adapter, lora_layers  # noqa: E402
from tokenizer import ByteTokenizer  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402
from paging import (ADAPTER, KV, HostAdapter, PageAllocator, PoolConfig, PoolFullError,  # noqa: E402
                    UnifiedPool, kv_pages)
import quant  # noqa: E402
from quant import quantize_rows  # noqa: E402
from scheduler import Request, RequestRejected, Scheduler, SchedulerConfig, State  # noqa: E402

REAL_MODEL = os.environ.get("LORA_MODEL_PATH")
needs_real_model = pytest.mark.skipif(not REAL_MODEL, reason="LORA_MODEL_PATH not set (path of the SmolLM2 GGUF)")


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    return M.Llama(M.ModelConfig.tiny(**kw)).eval()


@pytest.fixture(scope="module")
def real():
    if not REAL_MODEL:
        pytest.skip("LORA_MODEL_PATH not set (path of the SmolLM2 GGUF)")
    return C.load_model(REAL_MODEL)


def randomize_lora(model, seed=1):
    torch.manual_seed(seed)
    for m in lora.lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)


# ------------------------------------------------------------------------------ LoRA (lora.py)

def test_lora_at_init_equals_base_exactly():
    base = tiny_llama()
    x = torch.randint(0, 259, (2, 9))
    ref = base(x)
    lora.add_lora(base, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    assert torch.equal(base(x), ref)


def test_lora_forward_is_the_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 7, bias=False)
    wrapped = lora.LoRALinear(lin, LoRAConfig(r=3, alpha=6))
    torch.nn.init.normal_(wrapped.lora_B.weight)
    x = torch.randn(5, 12)
    A, B, W0 = wrapped.lora_A.weight, wrapped.lora_B.weight, lin.weight
    expected = x @ W0.T + (6 / 3) * x @ A.T @ B.T              # h = W0 x + (alpha/r) B A x
    assert torch.allclose(wrapped(x), expected, atol=1e-5)
    rs = lora.LoRALinear(torch.nn.Linear(12, 7), LoRAConfig(r=4, alpha=6, use_rslora=True))
    assert rs.scale == pytest.approx(6 / 2)


def test_merge_unmerge():
    m = tiny_llama()
    w0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora.add_lora(m, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj")))
    randomize_lora(m)
    x = torch.randint(0, 259, (2, 9))
    unmerged = m(x)
    lora.merge_lora(m)
    merged = m(x)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    w_merged = m.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    lora.merge_lora(m)                                           # idempotent
    assert torch.equal(m.model.layers[0].self_attn.q_proj.base.weight, w_merged)
    lora.unmerge_lora(m)
    lora.unmerge_lora(m)
    assert torch.allclose(m.model.layers[0].self_attn.q_proj.base.weight, w0, atol=1e-6)
    assert torch.allclose(m(x), unmerged, atol=1e-5)


def test_only_lora_weights_train():
    m = tiny_llama()
    lora.add_lora(m, LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj")))
    lora.mark_only_lora_trainable(m)
    trainable, total = lora.count_parameters(m)
    n_lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    assert trainable == n_lora and 0 < trainable < total
    m(torch.randint(0, 259, (2, 8))).sum().backward()
    for name, p in m.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_adapter_round_trip_and_peft_format(tmp_path):
    m = tiny_llama()
    cfg = LoRAConfig(r=3, alpha=6, targets=("q_proj", "o_proj", "up_proj"))
    lora.add_lora(m, cfg)
    randomize_lora(m)
    lora.save_adapter(m, tmp_path, cfg)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 3 and conf["lora_alpha"] == 6
    assert sorted(conf["target_modules"]) == ["o_proj", "q_proj", "up_proj"] and conf["bias"] == "none"
    keys = load_file(tmp_path / "adapter_model.safetensors")
    a = keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = keys["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    assert list(a.shape) == [3, 48] and list(b.shape) == [96, 3]
    fresh = tiny_llama()
    lora.load_adapter(fresh, tmp_path)
    for name, p in m.named_parameters():
        assert torch.equal(p, fresh.get_parameter(name)), name
    x = torch.randint(0, 259, (1, 7))
    assert torch.equal(m(x), fresh(x))


def test_peft_key_names_attention_and_mlp_projections():
    assert lora.peft_key(3, "q_proj", "lora_A") == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert lora.peft_key(0, "down_proj", "lora_B") == "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"


def _write_adapter(path, conf=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    text = conf if isinstance(conf, str) else json.dumps({**base, **(conf or {})})   # a str: the raw file
    (path / "adapter_config.json").write_text(text)
    if tensors is None:
        tensors = {}
        for i in range(2):
            tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 48)
            tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(48, 2)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


BAD_ADAPTERS = {
    "missing key": lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"),
    "unknown key": lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}),
    "shape": lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 40)}),
    "rank": lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(48, 3)}),
    "nan": lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].fill_(float("nan")),
    "inf": lambda t: t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].fill_(float("inf")),
    "one layer's shape": lambda t: t.update({
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(40, 2)}),
    "A input width": lambda t: t.update({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight":
                                         torch.zeros(2, 40) for i in range(2)}),
    "layer the model lacks": lambda t: t.update({
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(48, 2)}),
}
BAD_CONFIGS = {"dora": {"use_dora": True}, "modules_to_save": {"modules_to_save": ["lm_head"]},
               "bias": {"bias": "all"}, "target the model lacks": {"target_modules": ["q_proj", "c_attn"]},
               "not lora": {"peft_type": "IA3"}, "no rank": {"r": 0}, "negative rank": {"r": -2},
               "rank true": {"r": True}, "alpha null": {"lora_alpha": None},
               "alpha nan": {"lora_alpha": float("nan")}, "alpha inf": {"lora_alpha": float("inf")},
               "config a list": '[{"peft_type": "LORA", "r": 2}]'}
# what the message says besides the file's name
BAD_REASONS = {"missing key": "missing", "unknown key": "unexpected key", "shape": "every layer",
               "rank": "rank r=2", "nan": "NaN", "inf": "NaN or Inf", "layer the model lacks": "lacks",
               "one layer's shape": "every layer", "A input width": "lora_A input width",
               "dora": "use_dora", "modules_to_save": "modules_to_save", "bias": "bias",
               "target the model lacks": "c_attn", "not lora": "peft_type", "no rank": "r=0",
               "negative rank": "r=-2", "rank true": "r=True must be an integer", "alpha null": "alpha=None",
               "alpha nan": "alpha=nan", "alpha inf": "alpha=inf", "config a list": "JSON object, got a list"}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS) + list(BAD_CONFIGS))
def test_bad_adapter_is_refused_and_changes_nothing(tmp_path, case):
    torch.manual_seed(0)
    good = _write_adapter(tmp_path / "good")
    tensors = load_file(good / "adapter_model.safetensors")
    if case in BAD_ADAPTERS:
        BAD_ADAPTERS[case](tensors)
    _write_adapter(tmp_path / "bad", BAD_CONFIGS.get(case), tensors)
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(AdapterError, match="bad") as refused:  # the message names the file
        lora.load_adapter(m, tmp_path / "bad")
    assert BAD_REASONS[case] in str(refused.value)                # and the problem
    assert not lora.lora_layers(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    lora.load_adapter(m, good)                                    # the good one still loads


@pytest.mark.parametrize("targets", [["self_attn.q_proj"], ["model.layers.0.self_attn.q_proj",
                                     "model.layers.1.self_attn.q_proj"], "all-linear"])
def test_peft_target_modules_as_path_suffixes_full_paths_or_all_linear_load(tmp_path, targets):
    torch.manual_seed(0)
    m = tiny_llama()
    lora.add_lora(m, LoRAConfig(r=2, alpha=4, targets=tuple(lora.TARGET_NAMES.values())))
    randomize_lora(m)
    lora.save_adapter(m, tmp_path, LoRAConfig(r=2, alpha=4, targets=("q_proj",)))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    if targets != "all-linear":             # the file holds q_proj only, as PEFT would write it
        tensors = {k: v for k, v in tensors.items() if ".q_proj." in k}
    _write_adapter(tmp_path / "ad", {"target_modules": targets}, tensors)
    fresh = tiny_llama()
    cfg = lora.load_adapter(fresh, tmp_path / "ad")
    want = set(lora.TARGET_NAMES.values()) if targets == "all-linear" else {"q_proj"}
    assert set(cfg.targets) == want == {n.rsplit(".", 1)[-1] for n in lora_layers(fresh)}
    for name, layer in lora_layers(fresh).items():
        assert torch.equal(layer.lora_B.weight, lora_layers(m)[name].lora_B.weight), name


def test_adapter_on_some_layers_only_is_refused_by_name(tmp_path):
    one = {k: v for k, v in load_file(_write_adapter(tmp_path / "good") / "adapter_model.safetensors").items()
           if ".layers.0." in k}
    _write_adapter(tmp_path / "paths", {"target_modules": ["model.layers.1.self_attn.q_proj"]}, one)
    with pytest.raises(AdapterError, match=r"q_proj in layers \[1\] only"):
        lora.read_adapter(tmp_path / "paths")
    _write_adapter(tmp_path / "first", {"target_modules": ["model.layers.0.self_attn.q_proj"]}, one)
    with pytest.raises(AdapterError, match=r"q_proj is adapted in layers \[0\] of the model's 2"):
        lora.load_adapter(tiny_llama(), tmp_path / "first")
    _write_adapter(tmp_path / "regex", {"target_modules": ".*q_proj"}, one)
    with pytest.raises(AdapterError, match="all-linear"):
        lora.read_adapter(tmp_path / "regex")


def test_saved_adapter_records_the_base_model_name(tmp_path):
    m = tiny_llama()
    lora.add_lora(m, LoRAConfig(r=2, targets=("q_proj",)))
    lora.save_adapter(m, tmp_path, LoRAConfig(r=2, targets=("q_proj",)), "my-org/my-model")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/my-model"


def test_unreadable_adapter_files(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        lora.read_adapter(tmp_path)
    _write_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="JSON"):
        lora.read_adapter(tmp_path)
    _write_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="safetensors"):
        lora.read_adapter(tmp_path)


# ------------------------------------------------------------------------------ Llama (model.py)

def test_generate_batched_equals_one_by_one_greedy():
    m = tiny_llama()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9]]
    out = m.generate(prompts, 5)
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(5):  # no cache, no padding: the plain causal forward
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
        assert o == seq[len(p):]


def test_generate_stops_at_eos():
    m = tiny_llama()
    first = m.generate([[5, 6, 7]], 4)[0]
    assert m.generate([[5, 6, 7]], 4, eos_id=first[1])[0] == first[:2]


def test_rope_rotates_pairs_by_position():
    cos, sin = M.rope_cos_sin(torch.tensor([3]), 4, theta=100.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    angle = [3 * 100.0 ** (-0 / 4), 3 * 100.0 ** (-2 / 4)]        # m * theta^(-2i/hd)
    c, s = np.cos(angle), np.sin(angle)
    expected = [1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 3 * c[0] + 1 * s[0], 4 * c[1] + 2 * s[1]]
    assert torch.allclose(M.apply_rope(x, cos, sin), torch.tensor([expected], dtype=torch.float32), atol=1e-6)


def tiny_bpe_tokenizer():
    """Byte tokens plus two merges ('a','b') -> 'ab', ('ab','c') -> 'abc', and two specials."""
    u = tok_mod.bytes_to_unicode()
    tokens = [u[b] for b in range(256)] + ["ab", "abc", "<|endoftext|>", "<|im_end|>"]
    return tok_mod.Tokenizer(tokens, [258, 259], ["a b", "ab c"], tok_mod.GPT2_PATTERN, 258, 259)


def test_hf_format_round_trip(tmp_path):
    tok = tiny_bpe_tokenizer()
    m = tiny_llama(vocab_size=tok.vocab_size)
    C.save_hf(m, tmp_path, tok)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["num_key_value_heads"] == 2
    m2, tok2 = C.load_model(str(tmp_path))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert tok2.encode("abcab c<|im_end|>", allow_special=True) == tok.encode("abcab c<|im_end|>", allow_special=True)
    assert tok.encode("abcab c") == [257, 256, 32, 99]


def _llama_cpp_permute(w, n_heads):
    """The q/k row order that llama.cpp's converter writes (the inverse of model.unpermute_qk)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def test_gguf_loading_matches_the_hf_layout(tmp_path):
    import gguf
    Q = gguf.GGMLQuantizationType
    QUANTIZED = {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "ffn_up": Q.Q4_1}
    tok = tiny_bpe_tokenizer()
    m = tiny_llama(vocab_size=tok.vocab_size, dim=64, n_heads=4, ffn_dim=128)   # quant blocks of 32
    c, path = m.config, str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.n_layers), w.add_embedding_length(c.dim), w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads), w.add_head_count_kv(c.n_kv_heads), w.add_context_length(c.max_seq_len)
    w.add_layer_norm_rms_eps(c.norm_eps), w.add_rope_freq_base(c.rope_theta)
    w.add_tokenizer_model("gpt2"), w.add_token_list(tok.tokens), w.add_token_merges(tok.merges)
    w.add_token_types([1] * 258 + [3, 3]), w.add_bos_token_id(258), w.add_eos_token_id(259)
    inverse = {v: k for k, v in C.GGUF_NAMES.items()}
    for name, t in m.state_dict().items():
        t = t.numpy()
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{inverse[rest]}.weight"
            t = _llama_cpp_permute(torch.from_numpy(t), c.n_heads).numpy() if rest.endswith("q_proj") else t
            t = _llama_cpp_permute(torch.from_numpy(t), c.n_kv_heads).numpy() if rest.endswith("k_proj") else t
        else:
            gname = f"{inverse[name[:-len('.weight')]]}.weight"
        qtype = QUANTIZED.get(gname.split(".")[-2]) if gname.startswith("blk.0.") else None
        if qtype is not None:                # the block formats on layer 0, F32/F16 elsewhere
            q = gguf.quants.quantize(t, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, t.astype(np.float16) if "mlp" in name else t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    loaded, tok2 = C.load_model(path)
    for name, want in m.state_dict().items():
        got = loaded.state_dict()[name]
        if ".layers.0." in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "up_proj"):
            # block formats: error within one quantization step (a row mix-up would be far larger)
            assert (got - want).abs().max() <= (want.max() - want.min()) / 15, name
        elif "mlp" in name:
            assert torch.allclose(got, want, atol=1e-4), name       # F16
        else:
            assert torch.equal(got, want), name                     # F32, q/k rows un-permuted exactly
    assert tok2.encode("abc ab") == tok.encode("abc ab")


def test_qwen2_gguf_loads_biases_and_unpermuted_rows(tmp_path):
    import gguf
    tok = tiny_bpe_tokenizer()
    m = tiny_llama(vocab_size=tok.vocab_size, qkv_bias=True, tie_embeddings=True)
    c, path = m.config, str(tmp_path / "qwen2.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(c.n_layers), w.add_embedding_length(c.dim), w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads), w.add_head_count_kv(c.n_kv_heads), w.add_context_length(c.max_seq_len)
    w.add_layer_norm_rms_eps(c.norm_eps), w.add_rope_freq_base(c.rope_theta)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("qwen2"), w.add_token_list(tok.tokens)
    w.add_token_merges(tok.merges), w.add_token_types([1] * 258 + [3, 3])
    w.add_bos_token_id(258), w.add_eos_token_id(259)
    inverse = {v: k for k, v in C.GGUF_NAMES.items()}
    for name, t in m.state_dict().items():
        if name == "lm_head.weight":
            continue                                  # tied: no output tensor
        parts = name.split(".")
        gname = (f"blk.{parts[2]}.{inverse['.'.join(parts[3:-1])]}.{parts[-1]}" if parts[1] == "layers"
                 else f"{inverse['.'.join(parts[:-1])]}.{parts[-1]}")
        w.add_tensor(gname, t.numpy())               # qwen2: q/k rows as in Hugging Face, no permutation
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    loaded, tok2 = C.load_model(path)
    assert loaded.config.qkv_bias and not loaded.config.o_bias and tok2.pattern == tok_mod.QWEN2_PATTERN
    for name, want in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], want), name


def test_byte_tokenizer():
    t = tok_mod.ByteTokenizer()
    ids = t.encode("hé<|im_end|>x", allow_special=True)
    assert ids == [104, 195, 169, t.special["<|im_end|>"], 120]
    assert t.decode(ids) == "hé<|im_end|>x"
    assert t.encode("<|im_end|>") == list(b"<|im_end|>")


# Reference ids from SmolLM2's Hugging Face tokenizer (the `tokenizers` library on the same vocabulary).
SMOLLM_CASES = {
    "Hello world": [19556, 905],
    "a  1": [81, 256, 33],
    "abc 123 4567 x": [25276, 216, 33, 34, 35, 216, 36, 37, 38, 39, 1792],
    "  leading spaces\n\n\ttabs  \n": [216, 2899, 5600, 1116, 197, 100, 7366, 32057],
    "naïve café – 東京 Привет мир 🤗": [3546, 46494, 37366, 816, 17097, 247, 126, 16736, 122, 5470,
                                      249, 46879, 16464, 32547, 41337, 7872, 9175, 15107, 114, 241],
    "don't I'll we've": [12420, 982, 339, 3060, 392, 3543],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
    "x=1+2.5e-3; y!=z?": [104, 45, 33, 27, 34, 30, 37, 85, 29, 35, 43, 329, 42732, 106, 47],
    "1 2  3   4": [33, 216, 34, 256, 35, 333, 36],
}


def test_real_tokenizer_agrees_with_reference(real):
    _, tok = real
    for text, ids in SMOLLM_CASES.items():
        assert tok.encode(text, allow_special=True) == ids, text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>") != [2]                    # without allow_special it is plain text
    assert tok.encode("a\x04b\x13c") == [81, 82, 83]          # bytes with no token: no panic, dropped


def test_real_model_continues_sensibly(real):
    m, tok = real
    out = m.generate([tok.encode("The capital of France is")], 8, tok.eos_id)[0]
    assert "Paris" in tok.decode(out)


# ------------------------------------------------------------------------------ checkpoints (checkpoints.py)

def dense_logits(c: dict, state: dict, tokens):
    """An independent Llama / Mistral / Qwen2 forward from a config.json dict (either transformers
    layout) and a float32 state dict: plain torch, no code of model.py. tokens [T] -> logits [T, V]."""
    rope = c.get("rope_parameters") or {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 1e4)}
    H, nh = c["hidden_size"], c["num_attention_heads"]
    nkv, hd = c.get("num_key_value_heads", nh), c.get("head_dim") or H // nh
    freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        freq = freq / rope["factor"]
    if kind == "llama3":
        wave, old = 2 * math.pi / freq, rope["original_max_position_embeddings"]
        lo, hi = rope["low_freq_factor"], rope["high_freq_factor"]
        mix = ((old / wave - lo) / (hi - lo)).clamp(0, 1)          # 0: long waves, 1: short waves
        freq = freq * mix + freq / rope["factor"] * (1 - mix)
    T = len(tokens)
    ang = torch.arange(T).double()[:, None] * freq[None]           # [T, hd/2]
    cos, sin = ang.cos().repeat(1, 2).float(), ang.sin().repeat(1, 2).float()

    def rot(x):  # x [heads, T, hd]
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    def lin(name, x):
        y = x @ state[name + ".weight"].T
        return y + state[name + ".bias"] if name + ".bias" in state else y

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.get("rms_norm_eps", 1e-6)) * w

    x = state["model.embed_tokens.weight"][tokens]
    causal = torch.ones(T, T).tril().bool()
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, state[p + "input_layernorm.weight"])
        q = rot(lin(p + "self_attn.q_proj", h).view(T, nh, hd).transpose(0, 1))
        k = rot(lin(p + "self_attn.k_proj", h).view(T, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
        v = lin(p + "self_attn.v_proj", h).view(T, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        att = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~causal, -math.inf).softmax(-1)
        x = x + lin(p + "self_attn.o_proj", (att @ v).transpose(0, 1).reshape(T, nh * hd))
        h = norm(x, state[p + "post_attention_layernorm.weight"])
        gate, up = lin(p + "mlp.gate_proj", h), lin(p + "mlp.up_proj", h)
        x = x + lin(p + "mlp.down_proj", gate * torch.sigmoid(gate) * up)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return norm(x, state["model.norm.weight"]) @ head.T


def hf_checkpoint(path, family="llama", layout=4, rope=None, dtype=torch.float32, head_dim=None,
                  bias=False, tie=False, extra=None, seed=0):
    """A tiny random checkpoint as transformers 4 or 5 writes config.json, with a byte-level
    tokenizer.json; weights scaled up so that attention and RoPE matter. Returns (config, state)."""
    H, nh, nkv, L, V, F = 32, 4, 2, 2, 260, 64
    hd = head_dim or H // nh
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (nh * hd, H), "self_attn.k_proj": (nkv * hd, H),
              "self_attn.v_proj": (nkv * hd, H), "self_attn.o_proj": (H, nh * hd),
              "mlp.gate_proj": (F, H), "mlp.up_proj": (F, H), "mlp.down_proj": (H, F)}
    state = {"model.embed_tokens.weight": torch.randn(V, H, generator=g),
             "model.norm.weight": 1 + 0.1 * torch.randn(H, generator=g)}
    if not tie:
        state["lm_head.weight"] = torch.randn(V, H, generator=g) / H ** 0.5
    for i in range(L):
        for name, shape in shapes.items():
            state[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5 * 2
            if (bias or family == "qwen2") and ("q_proj" in name or "k_proj" in name or "v_proj" in name
                                                or bias and "o_proj" in name):
                state[f"model.layers.{i}.{name}.bias"] = torch.randn(shape[0], generator=g)
        for n in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{n}.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    c = {"architectures": [arch], "model_type": family, "hidden_size": H, "intermediate_size": F,
         "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": V,
         "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": tie,
         "hidden_act": "silu", "bos_token_id": 256, "eos_token_id": 257}
    if head_dim:
        c["head_dim"] = head_dim
    if family == "llama":
        c["attention_bias"] = bias
    if family == "mistral":
        c["sliding_window"] = None
    rope = {"rope_type": "default", **(rope or {})}
    if layout == 5:
        c["rope_parameters"] = {"rope_theta": 50.0, **rope}
    else:
        c["rope_theta"] = 50.0
        if rope["rope_type"] != "default":
            c["rope_scaling"] = rope
    c.update(extra or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    save_file({k: v.to(dtype) for k, v in state.items()}, str(path / "model.safetensors"))
    u = tok_mod.bytes_to_unicode()
    tok = tok_mod.Tokenizer([u[b] for b in range(256)] + ["<s>", "</s>", "ab", "abc"], [256, 257], ["a b", "ab c"],
                      tok_mod.GPT2_PATTERN, 256, 257)
    (path / "tokenizer.json").write_text(json.dumps(tok_mod.tokenizer_json(tok)))
    return c, {k: v.to(dtype).float() for k, v in state.items()}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CHECKPOINTS = {   # name: keyword arguments of hf_checkpoint
    "llama-4": {}, "llama-5": {"layout": 5},
    "llama3-rope-4": {"rope": LLAMA3_ROPE}, "llama3-rope-5": {"rope": LLAMA3_ROPE, "layout": 5},
    "linear-rope-5": {"rope": {"rope_type": "linear", "factor": 4.0}, "layout": 5},
    "head-dim-16": {"head_dim": 16}, "attention-bias": {"bias": True}, "tied": {"tie": True},
    "mistral-4": {"family": "mistral"}, "mistral-5": {"family": "mistral", "layout": 5},
    "qwen2-5": {"family": "qwen2", "layout": 5, "extra": {"use_sliding_window": False}},
    "bfloat16": {"dtype": torch.bfloat16}, "float16": {"dtype": torch.float16},
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_every_supported_checkpoint_equals_an_independent_dense_forward(tmp_path, name):
    c, state = hf_checkpoint(tmp_path, **CHECKPOINTS[name])
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
    model, _ = C.load_model(str(tmp_path))
    want_dtype = CHECKPOINTS[name].get("dtype", torch.float32)
    assert model.lm_head.weight.dtype == want_dtype                        # kept in its dtype
    with torch.no_grad():
        got = model.float()(tokens[None])[0]
    want = dense_logits(c, state, tokens)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    if "rope" in CHECKPOINTS[name]:   # the scaling matters at these positions: without it, far off
        plain = dense_logits({**c, "rope_scaling": None, "rope_parameters": None, "rope_theta": 50.0}, state, tokens)
        assert (plain - want).abs().max() > 1e-2 * want.abs().max()


REFUSED = {   # extra config keys -> the words the error must contain
    "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    "dynamic": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 50.0}}, "dynamic"),
    "unknown key": ({"num_experts": 8}, "num_experts"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act"),
    "architecture": ({"architectures": ["GemmaForCausalLM"]}, "GemmaForCausalLM"),
    "window": ({"architectures": ["MistralForCausalLM"], "sliding_window": 64}, "sliding_window=64"),
    "qwen2 window": ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_checkpoint_is_refused_by_name(tmp_path, case):
    extra, words = REFUSED[case]
    hf_checkpoint(tmp_path, extra=extra)
    with pytest.raises(C.CheckpointError, match=words):
        C.load_model(str(tmp_path))


# What transformers 5.25 writes converting a GGUF (from_pretrained(gguf_file=...), save_pretrained),
# and PretrainedConfig's generic keys as hub configs carry them: none changes the logits.
GENERIC_KEYS = {"_model_name_or_path": "x.gguf", "unk_token_id": None, "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0}, "problem_type": None, "torchscript": False,
                "task_specific_params": None, "finetuning_task": None, "sep_token_id": None,
                "decoder_start_token_id": None, "is_encoder_decoder": False,
                "chunk_size_feed_forward": 0, "max_length": 20, "num_beams": 1, "pruned_heads": {},
                "tie_encoder_decoder": False, "use_bfloat16": False}


def logits_of(path, **kw):
    model, _ = C.load_model(str(path), **kw)
    with torch.no_grad():
        return model(torch.arange(20)[None])[0]


def test_generic_config_keys_load_and_change_no_logit(tmp_path):
    hf_checkpoint(tmp_path / "plain")
    hf_checkpoint(tmp_path / "generic", extra=GENERIC_KEYS)
    assert torch.equal(logits_of(tmp_path / "plain"), logits_of(tmp_path / "generic"))


def test_unknown_config_key_is_named_as_unknown_and_can_be_ignored_explicitly(tmp_path, capsys):
    hf_checkpoint(tmp_path / "plain")
    hf_checkpoint(tmp_path / "odd", extra={"foo_bar": 3})
    with pytest.raises(C.CheckpointError, match="foo_bar: unknown to this loader.*--ignore-config-key foo_bar"):
        C.load_model(str(tmp_path / "odd"))
    got = logits_of(tmp_path / "odd", ignore_keys=("foo_bar",))
    assert torch.equal(got, logits_of(tmp_path / "plain"))
    assert "ignoring foo_bar" in capsys.readouterr().err
    for extra, key in (({"hidden_act": "gelu"}, "hidden_act"), ({"num_experts": 8}, "num_experts"),
                       ({"is_encoder_decoder": True}, "is_encoder_decoder")):
        hf_checkpoint(tmp_path / key, extra=extra)            # known to change it: ignoring is no way out
        with pytest.raises(C.CheckpointError, match=f"{key}.*would change the computation"):
            C.load_model(str(tmp_path / key), ignore_keys=(key,))


def test_save_hf_round_trips_every_config_field(tmp_path):
    for i, kw in enumerate([{"rope": LLAMA3_ROPE}, {"family": "qwen2"}, {"head_dim": 16, "bias": True}]):
        hf_checkpoint(tmp_path / f"in{i}", **kw)
        model, tok = C.load_model(str(tmp_path / f"in{i}"))
        C.save_hf(model, str(tmp_path / f"out{i}"), tok)
        again, _ = C.load_model(str(tmp_path / f"out{i}"))
        assert again.config == dataclasses.replace(model.config, name=f"out{i}")
        tokens = torch.arange(30)[None]
        assert torch.equal(again(tokens), model(tokens))


def test_pre_tokenizers_of_llama3_and_qwen2_split_digits_their_way():
    split = lambda pattern: {"type": "Sequence", "pretokenizers": [   # noqa: E731
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    u = tok_mod.bytes_to_unicode()
    for pattern, pieces in ((tok_mod.LLAMA3_PATTERN, ["123", "45"]), (tok_mod.QWEN2_PATTERN, list("12345"))):
        assert tok_mod.pretokenizer_pattern(split(pattern), "t") == pattern
        merges = ["1 2", "12 3", "4 5"]
        tok = tok_mod.Tokenizer([u[b] for b in range(256)] + ["12", "123", "45"], [], merges, pattern, 0, 0)
        assert [tok.decode([t]) for t in tok.encode("12345")] == pieces
    with pytest.raises(ValueError, match="Metaspace"):
        tok_mod.pretokenizer_pattern({"type": "Metaspace"}, "tokenizer.json")


def test_merge_command_writes_a_model_equal_to_base_plus_adapter(tmp_path):
    hf_checkpoint(tmp_path / "base")
    model, _ = C.load_model(str(tmp_path / "base"))
    lora.add_lora(model, LoRAConfig(r=2, alpha=4.0, targets=("q_proj", "down_proj")))
    randomize_lora(model)
    lora.save_adapter(model, str(tmp_path / "ad"), LoRAConfig(r=2, alpha=4.0, targets=("q_proj", "down_proj")))
    C.merge_and_export(C.MergeConfig(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out")))
    merged, _ = C.load_model(str(tmp_path / "out"))
    tokens = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.allclose(merged(tokens), model.eval()(tokens), atol=1e-5)
    assert not lora.lora_layers(merged)



# ------------------------------------------------------------------------------ fine-tuning on E2E (train.py)

PAIRS = [("name[Aromi], food[Thai]", "Aromi serves Thai food."),
         ("name[Aromi], food[Thai]", "Thai food is served at Aromi."),
         ("name[Bibimbap], area[riverside]", "Bibimbap is by the river."),
         ("name[Cotto], priceRange[cheap]", "Cotto is cheap."),
         ("name[Zizzi], eatType[pub]", "Zizzi is a pub.")]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second thread costs more in start-up than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    base = Llama(ModelConfig.tiny(vocab_size=tok.vocab_size)).eval()
    # With every weight at std 0.02 the logits stay within about +-1 whatever the hidden state, so
    # no adapter could fit anything; a larger output layer gives them a trained model's range.
    torch.nn.init.normal_(base.lm_head.weight, std=0.5)
    examples = [train.encode_example(tok, mr, ref, 96) for mr, ref in PAIRS]
    return base, tok, examples


def fixed_batch_loss(net, examples):
    tokens, mask, _ = next(sft_data.batches(examples, len(examples), random.Random(0)))
    net.eval()
    with torch.no_grad():
        return trainer.lm_loss(net, tokens, mask, 0.0).item()


# ------------------------------------------------------------------------------------ data

def test_csv_loader_quoted_commas_and_grouping(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text('\ufeffmr,ref\n"name[A], food[Thai]","A serves Thai food, cheaply."\n'
                    '"name[A], food[Thai]","Thai, at A."\n"name[B]","B, by the river."\n', encoding="utf-8")
    rows = e2e.read_e2e(path)
    assert rows == [("name[A], food[Thai]", "A serves Thai food, cheaply."), ("name[A], food[Thai]", "Thai, at A."),
                    ("name[B]", "B, by the river.")]
    assert e2e.group_refs(rows) == [("name[A], food[Thai]", ["A serves Thai food, cheaply.", "Thai, at A."]),
                                      ("name[B]", ["B, by the river."])]


def test_csv_loader_rejects_wrong_header(tmp_path):
    path = tmp_path / "testset.csv"
    path.write_text('MR\n"name[A]"\n')
    with pytest.raises(e2e.DataError, match="mr,ref"):
        e2e.read_e2e(path)


def test_missing_data_message_names_files_and_url(tmp_path):
    def offline(url, dest):
        raise OSError("network unreachable")
    with pytest.raises(e2e.DataError) as e:
        e2e.ensure_data(str(tmp_path / "e2e"), fetch=offline)
    msg = str(e.value)
    assert e2e.E2E_URL in msg and "testset_w_refs.csv" in msg and "trainset.csv" in msg and "E2E_DATA" in msg


def test_download_unpacks_nested_zip_and_falls_back_to_dev(tmp_path):
    def fake_fetch(url, dest):
        assert url == e2e.E2E_URL
        with zipfile.ZipFile(dest, "w") as z:
            z.writestr("e2e-dataset/devset.csv", 'mr,ref\n"name[A]","A."\n')
            z.writestr("e2e-dataset/testset_w_refs.csv", 'mr,ref\n"name[B]","B."\n')
    paths = e2e.ensure_data(str(tmp_path), fetch=fake_fetch)
    assert paths["train"] is None and e2e.read_e2e(paths["test"]) == [("name[B]", "B.")]
    assert train.load_splits(train.TrainConfig(e2e_dir=str(tmp_path)), log=lambda s: None)[1] == "dev"


def test_loss_mask_covers_exactly_the_reference_and_end_token():
    tok = ByteTokenizer()
    ids, is_target = train.encode_example(tok, "name[A]", "A.", 64)
    assert ids == list(b"name[A]\n A.") + [tok.eos_id]
    assert is_target == [False] * len("name[A]\n") + [True] * len(" A.") + [True]
    tokens, mask, n_real = next(sft_data.batches([(ids, is_target)], 1, random.Random(0)))
    assert tokens[0, 1:][mask[0]].tolist() == list(b" A.") + [tok.eos_id] and n_real == len(ids)


@pytest.mark.skipif(not os.environ.get("E2E_DATA"), reason="E2E_DATA (folder with the E2E CSV files) is not set")
def test_real_test_split_counts():
    groups = e2e.group_refs(e2e.read_e2e(os.path.join(os.environ["E2E_DATA"], "testset_w_refs.csv")))
    assert len(groups) == 630 and sum(len(r) for _, r in groups) == 4693


def test_prompt_completion_record_learns_the_completion_and_end_token_only():
    tok = ByteTokenizer()
    ids, is_target = sft_data.encode_record(tok, {"prompt": "Q: 2+2?\n", "completion": "A: 4"}, 64)
    assert ids == list(b"Q: 2+2?\nA: 4") + [tok.eos_id]
    assert [t for t, learn in zip(ids, is_target) if learn] == list(b"A: 4") + [tok.eos_id]
    ids, is_target = sft_data.encode_record(tok, {"prompt": "Q: 2+2?\n", "completion": "A: 4"}, 10)
    assert len(ids) == len(is_target) == 10                         # cut to --seq-len


def test_chat_record_is_chatml_and_learns_the_assistant_turns_only():
    tok = ByteTokenizer()
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Bye."}]}
    ids, is_target = sft_data.encode_record(tok, rec, 512)
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                               "<|im_start|>assistant\nBye.<|im_end|>\n")
    assert [t for t, learn in zip(ids, is_target) if learn] == \
        tok.encode("Hello.<|im_end|>Bye.<|im_end|>", allow_special=True)


def test_malformed_records_are_listed_with_file_line_and_reason_before_any_model_work(tmp_path, no_model):
    path = tmp_path / "my.jsonl"
    lines = ['{"prompt": "a", "completion": "b"}', "", "{not json", '["a list"]', '{"prompt": "a"}',
             '{"messages": [{"role": "user", "content": "hi"}]}', '{"messages": [{"role": "bot", "content": "x"}]}',
             '{"prompt": "a", "completion": ""}', '{"prompt": "a", "completion": "b", "messages": []}']
    path.write_bytes("\n".join(lines).encode() + b'\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(sft_data.RecordError) as refused:
        train.main(train.TrainConfig(data=[str(path)], out=str(tmp_path / "out")), log=lambda s: None)
    message = str(refused.value)
    assert message.startswith("8 malformed records")
    for line, reason in [(3, "not JSON"), (4, "expected a JSON object, got list"),
                         (5, '"prompt" and "completion" must both be strings'),
                         (6, 'no "assistant" message'), (7, "message 0: expected"), (8, '"completion" is empty'),
                         (9, 'expected "prompt" and "completion", or "messages"'), (10, "not UTF-8")]:
        assert f"my.jsonl, line {line}: {reason}" in message, line
    assert "line 1:" not in message and "line 2:" not in message


# ------------------------------------------------------------------------------------ training

def test_lora_training_lowers_loss_changes_only_lora_and_reloads(tmp_path):
    base, tok, examples = tiny_setup()
    cfg = train.TrainConfig(steps=40, batch_size=4, lr=3e-2, warmup=2, rank=4, dropout=0.0, log_every=100)
    net, lcfg = trainer.prepare(copy.deepcopy(base), cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss0 = fixed_batch_loss(net, examples)
    trainer.train(net, examples, cfg, log=lambda s: None)
    assert fixed_batch_loss(net, examples) < 0.6 * loss0
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert len(changed) == 2 * len(lora_layers(net)) == 2 * 2 * 2    # A and B of q, v in 2 layers

    train.save_adapter(net, tmp_path, lcfg)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    fresh.eval()
    prompts = [f"{mr}\n" for mr, _ in PAIRS[2:]]
    cfg_eval = train.TrainConfig(max_new_tokens=12, eval_batch=2)
    want = decode.generate_outputs(net, tok, prompts, cfg_eval)
    assert decode.generate_outputs(fresh, tok, prompts, cfg_eval) == want
    tokens = torch.tensor([examples[0][0]])
    assert torch.allclose(fresh(tokens), net(tokens), atol=1e-5)


def test_full_method_trains_every_weight():
    base, _, _ = tiny_setup()
    net, lcfg = trainer.prepare(copy.deepcopy(base), train.TrainConfig(method="full"))
    trainable, total = train.count_parameters(net)
    assert lcfg is None and trainable == total == sum(p.numel() for p in base.parameters())


def test_run_one_writes_checkpoint_predictions_and_row(tmp_path):
    base, tok, examples = tiny_setup()
    base.config.name = "tiny-llama"                     # a checkpoint's HF folder or general.name
    groups = e2e.group_refs(PAIRS)
    cfg = train.TrainConfig(steps=2, batch_size=2, max_new_tokens=8, log_every=1)
    row = train.run_one(base, tok, examples, groups, cfg, str(tmp_path), log=lambda s: None)
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-llama"
    assert len((tmp_path / "predictions.txt").read_text().split("\n")) == len(groups) + 1
    # q: A [4, 48] + B [48, 4]; v: A [4, 48] + B [16, 4] (kv_dim 16), in 2 layers
    assert row["trainable"] == 2 * (4 * 48 + 48 * 4 + 4 * 48 + 16 * 4) and row["checkpoint_mb"] > 0
    assert set(train.COLUMNS) <= set(row) and "method" in train.table([row])


def test_beam_of_one_is_greedy_and_ngram_ban():
    base, tok, _ = tiny_setup(seed=3)
    prompt = tok.encode("name[Aromi]\n")
    cfg = train.TrainConfig(beam=1, no_repeat_ngram=0, max_new_tokens=10)
    greedy = base.generate([prompt], 10, eos_id=tok.eos_id)[0]
    assert decode.beam_search(base, [prompt], cfg, tok.eos_id) == [[t for t in greedy if t != tok.eos_id]]
    assert decode.repeated_ngram_ban([1, 2, 3, 1, 2], 3) == {3}
    assert decode.repeated_ngram_ban([1, 2, 3], 3) == set()
    cfg = train.TrainConfig(beam=3, no_repeat_ngram=2, max_new_tokens=12)
    out, = decode.beam_search(base, [prompt], cfg, tok.eos_id)
    bigrams = list(zip(out, out[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_beam_search_keeps_a_live_hypothesis_that_can_still_win():
    """K = 2, end token 0, length penalty 1: hand-made log-probs where two hypotheses have ended
    after step 2 but the live [1, 2] scores better per token; it ends at step 3 and wins."""
    beams = decode.Beams(1, 2, 1.0, "cpu")
    lg = lambda *rows: torch.tensor(rows).log() + beams.scores[:, None]   # noqa: E731
    assert beams.step(lg([0.5, 0.3, 0.2], [1 / 3] * 3), eos_id=0) == [0, 0]       # ends [] at -0.69
    assert beams.seqs == [[1], [2]]
    # [1, 2]: log .3 + log .9 = -1.309, -0.655 per token; [2] ends at (log .2 + log .9) / 2 = -0.857
    assert beams.step(lg([0.05, 0.05, 0.9], [0.9, 0.05, 0.05]), eos_id=0) == [0, 0]
    assert len(beams.finished[0]) == 3 and beams.seqs == [[1, 2], [1, 1]]        # 3 ended, still live
    beams.step(lg([0.99, 0.005, 0.005], [1 / 3] * 3), eos_id=0)   # [1, 2] ends: -1.319 / 3 = -0.44
    assert beams.live == [] and beams.best() == [[1, 2]]


def test_cli_flags_come_from_the_config():
    assert train.parse_args([]) == train.TrainConfig()
    cfg = train.parse_args(["--targets", "q,k,v,o", "--eval-limit", "5", "--no-baseline", "--method", "full"])
    assert (cfg.targets, cfg.eval_limit, cfg.no_baseline, cfg.method) == ("q,k,v,o", 5, True, "full")


@pytest.mark.skipif(not os.environ.get("LORA_MODEL_PATH"), reason="LORA_MODEL_PATH (the real model) is not set")
def test_real_model_lora_parameter_count():
    net, tok = train.load_model(os.environ["LORA_MODEL_PATH"])
    net, _ = trainer.prepare(net, train.TrainConfig())
    # r=4 on q (576 -> 576) and v (576 -> 192) in 30 layers: A [4, 576] and B [out, 4] each
    assert train.count_parameters(net)[0] == 30 * (4 * 576 + 576 * 4 + 4 * 576 + 192 * 4) == 230_400
    ids, is_target = train.encode_example(tok, "name[Aromi]", "Aromi.", 64)
    assert tok.decode(ids[is_target.index(True):-1]) == " Aromi." and ids[-1] == tok.eos_id


def e2e_folder(tmp_path, **files):
    """A data folder holding the given E2E CSVs: name (trainset, devset, testset_w_refs) -> bytes or str."""
    folder = tmp_path / "e2e"
    folder.mkdir(exist_ok=True)
    for name, body in files.items():
        (folder / f"{name}.csv").write_bytes(body if isinstance(body, bytes) else body.encode())
    return folder


GOOD_CSV = "mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS)


@pytest.fixture
def no_model(monkeypatch):
    """train.load_model fails the test: what it guards must be refused before any model work."""
    def load_model(path, ignore_keys=()):
        raise AssertionError("the model was loaded before the bad input was noticed")
    monkeypatch.setattr(train, "load_model", load_model)


BAD_FLAGS = {"rank 0": dict(rank=0), "rank -2": dict(rank=-2), "unknown target": dict(targets="q,foo"),
             "no steps": dict(steps=0), "no batch": dict(batch_size=0), "no eval batch": dict(eval_batch=0),
             "no seq-len": dict(seq_len=0), "adapter nowhere": dict(adapter="/nowhere/adapter"),
             "lr nan": dict(lr=float("nan")), "dropout 1.5": dict(dropout=1.5), "method": dict(method="lora2")}


@pytest.mark.parametrize("case", list(BAD_FLAGS) + ["out unwritable"])
def test_bad_flag_is_a_usage_error_naming_it_before_any_model_work(tmp_path, case, no_model):
    (tmp_path / "a-file").write_text("not a folder")
    bad = BAD_FLAGS.get(case) or dict(out=str(tmp_path / "a-file" / "out"))
    data = e2e_folder(tmp_path, devset=GOOD_CSV, testset_w_refs=GOOD_CSV)
    cfg = train.TrainConfig(**{"e2e_dir": str(data), "out": str(tmp_path / "out"), **bad})
    flag = "--" + next(iter(bad)).replace("_", "-")
    with pytest.raises(train.UsageError, match=flag):
        train.main(cfg, log=lambda s: None)


def test_command_line_refuses_a_bad_flag_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--rank", "-2"])
    assert exit_.value.code == 2 and "--rank must be at least 1, got -2" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context_is_refused_before_scoring(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()                                     # context: 512 tokens
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    data = e2e_folder(tmp_path, devset=GOOD_CSV, testset_w_refs=GOOD_CSV)
    cfg = train.TrainConfig(e2e_dir=str(data), out=str(tmp_path / "out"), max_new_tokens=500)
    with pytest.raises(train.UsageError, match="--max-new-tokens 500"):
        train.main(cfg, log=lambda s: None)
    assert not (tmp_path / "out" / "predictions_base.txt").exists()


BAD_DATA = {  # folder contents -> what the error names
    "training split with a header only": (dict(trainset="mr,ref\n", testset_w_refs=GOOD_CSV),
                                          r"trainset.csv: a header and no rows"),
    "test split with a header only": (dict(trainset=GOOD_CSV, testset_w_refs="mr,ref\n"),
                                      r"testset_w_refs.csv: a header and no rows"),
    "only the test split": (dict(testset_w_refs=GOOD_CSV), r"e2e: no training split"),
    "a missing cell": (dict(devset=GOOD_CSV + '"name[X]"\n', testset_w_refs=GOOD_CSV),
                       r"devset.csv, line 7: the ref cell is empty or missing"),
    "latin-1 bytes": (dict(devset=GOOD_CSV.encode() + '"name[Café]","Nice."\n'.encode("latin-1"),
                           testset_w_refs=GOOD_CSV), r"devset.csv, line 7: not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_with_file_and_line_before_any_model_work(tmp_path, case, no_model):
    files, message = BAD_DATA[case]
    cfg = train.TrainConfig(e2e_dir=str(e2e_folder(tmp_path, **files)), out=str(tmp_path / "out"))
    with pytest.raises(e2e.DataError, match=message):
        train.main(cfg, log=lambda s: None)


def test_batches_of_no_examples_fail_instead_of_spinning():
    with pytest.raises(ValueError, match="no training examples"):
        next(sft_data.batches([], 2, random.Random(0)))


def test_a_run_failing_in_evaluation_still_writes_results_and_adapter(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    def broken_scorer(hyps, refs):
        raise RuntimeError("scorer broke")
    monkeypatch.setattr(train, "e2e_metrics", broken_scorer)
    data = e2e_folder(tmp_path, devset=GOOD_CSV, testset_w_refs=GOOD_CSV)
    cfg = train.TrainConfig(e2e_dir=str(data), out=str(tmp_path / "out"), steps=2, batch_size=2,
                            max_new_tokens=4, no_baseline=True)
    with pytest.raises(RuntimeError, match="scorer broke"):
        train.main(cfg, log=lambda s: None)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failed"] == "RuntimeError: scorer broke"
    run = results["runs"][0]
    assert len(results["runs"]) == 1 and run["final_loss"] > 0 and "BLEU" not in run
    fresh = copy.deepcopy(base)
    lora.load_adapter(fresh, tmp_path / "out" / "adapter")        # the trained adapter is there, whole
    assert lora_layers(fresh)


def grads(net):
    return [p.grad.clone() for p in net.parameters() if p.requires_grad]


def test_grad_accumulation_equals_one_big_batch():
    base, _, examples = tiny_setup()
    cfg = train.TrainConfig(dropout=0.0, label_smoothing=0.1)
    net, _ = trainer.prepare(copy.deepcopy(base), cfg)
    randomize_lora(net)                                  # B != 0, so that A gets a gradient too
    loss_two, _ = trainer.accumulate(net, [sft_data.collate(examples[:2]), sft_data.collate(examples[2:])], cfg)
    two = grads(net)
    net.zero_grad()
    loss_one, _ = trainer.accumulate(net, [sft_data.collate(examples)], cfg)
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(two, grads(net)))


def test_gradient_is_clipped_to_max_grad_norm():
    base, _, examples = tiny_setup()
    net, _ = trainer.prepare(copy.deepcopy(base), train.TrainConfig(dropout=0.0))
    _, norm = trainer.accumulate(net, [sft_data.collate(examples)], train.TrainConfig())    # no clipping
    unclipped = torch.cat([g.flatten() for g in grads(net)]).norm().item()
    net.zero_grad()
    _, again = trainer.accumulate(net, [sft_data.collate(examples)], train.TrainConfig(max_grad_norm=0.01))
    assert norm == pytest.approx(unclipped, rel=1e-5) and again == pytest.approx(norm, rel=1e-5)
    assert torch.cat([g.flatten() for g in grads(net)]).norm().item() == pytest.approx(0.01, rel=1e-3)


def test_all_linear_targets_and_rslora_scale():
    base, _, _ = tiny_setup()
    net, lcfg = trainer.prepare(copy.deepcopy(base), train.TrainConfig(targets="all-linear", rank=4, alpha=8,
                                                                      rslora=True))
    assert len(lora_layers(net)) == 7 * 2 and set(lcfg.targets) == set(lora.TARGET_NAMES.values())
    assert all(m.scale == pytest.approx(8 / 2) for m in lora_layers(net).values())   # alpha / sqrt(r)


def jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": f"{mr}\n", "completion": ref}) + "\n" for mr, ref in pairs))
    return path


def test_own_data_run_reports_validation_loss_and_saves_the_adapter(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    data = jsonl(tmp_path / "my.jsonl", PAIRS * 2)
    cfg = train.TrainConfig(data=[str(data)], out=str(tmp_path / "out"), steps=6, batch_size=2, lr=3e-2,
                            warmup=1, val_fraction=0.2, eval_every=2, log_every=100)
    lines = []
    results = train.main(cfg, log=lines.append)
    assert (results["train_examples"], results["val_examples"]) == (8, 2)
    val = results["runs"][0]["val_losses"]
    assert [step for step, _ in val] == [2, 4, 6] and val[-1][1] < val[0][1]
    assert any("validation loss" in line for line in lines)
    fresh = copy.deepcopy(base)
    lora.load_adapter(fresh, tmp_path / "out" / "adapter")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["val_losses"] == val


def test_resumed_run_has_the_same_losses_as_an_uninterrupted_one(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    data = jsonl(tmp_path / "my.jsonl", PAIRS * 3)
    common = dict(data=[str(data)], steps=6, batch_size=2, grad_accum=2, lr=1e-2, warmup=2, dropout=0.1,
                  val_fraction=0.2, eval_every=2, save_every=3, log_every=100)
    straight = train.main(train.TrainConfig(out=str(tmp_path / "a"), **common), log=lambda s: None)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    resumed = train.main(train.TrainConfig(out=str(tmp_path / "b"), resume=str(checkpoint), **common),
                         log=lambda s: None)
    a, b = straight["runs"][0], resumed["runs"][0]
    assert len(a["losses"]) == len(b["losses"]) == 6 and a["losses"] == b["losses"]
    assert a["val_losses"] == b["val_losses"]
    for key, t in load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors").items():
        assert torch.equal(t, load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")[key])
    with pytest.raises(train.UsageError, match="--rank 4 there, 8 here"):
        train.main(train.TrainConfig(out=str(tmp_path / "c"), resume=str(checkpoint), **{**common, "rank": 8}))


def test_batched_beam_search_equals_one_prompt_at_a_time():
    base, tok, _ = tiny_setup(seed=3)
    prompts = [tok.encode(f"{mr}\n") for mr, _ in PAIRS] + [tok.encode("x\n")]
    greedy = base.generate(prompts, 8)
    later = [t for out in greedy for t in out[2:]]
    eos = max(set(later), key=later.count)                                  # an end token that occurs,
    cfg = train.TrainConfig(beam=3, no_repeat_ngram=2, max_new_tokens=10)   # so prompts finish apart
    together = decode.beam_search(base, prompts, cfg, eos)
    alone = [decode.beam_search(base, [p], cfg, eos)[0] for p in prompts]
    assert together == alone and len({len(out) for out in alone}) > 1


# ------------------------------------------------------------------ many adapters in one batch (multi_train.py)

def _rows(seed, n, longest):
    """n examples of random byte tokens: a 2-4 token prompt, a 2..longest token target."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, t = rng.randint(2, 4), rng.randint(2, longest)
        out.append(([rng.randrange(259) for _ in range(p + t)], [False] * p + [True] * t))
    return out


MULTI = {"small": dict(rank=2, targets="q,v", seed=1),
         "wide": dict(rank=3, targets="all-linear", seed=2, alpha=8.0),
         "long": dict(rank=4, targets="k,o", seed=3, lr=5e-3, dropout=0.2)}


def _multi_jobs(common):
    return [multi_train.make_job(name, common, opts, _rows(i, 8, 24 if name == "long" else 5),
                                 _rows(10 + i, 3, 5), where=name)
            for i, (name, opts) in enumerate(MULTI.items())]


@pytest.mark.parametrize("gathered", [False, True])
def test_adapters_trained_together_equal_each_trained_alone(tmp_path, gathered):
    """Three adapters of different ranks, alphas, learning rates, dropouts and targets, one with
    rows five times longer, trained in joint batches (one base forward for all rows, segments):
    after 4 steps of 2 micro-batches with clipping, each adapter's A, B, training and validation
    losses equal the same adapter trained alone by trainer.train (as train.py does: its seed, its
    rows in the same order); the saved PEFT directory loads like any other. gathered: the layers
    run kernels_train.SegmentLoRA (the GPU's path; here the kernels' references, the Triton ones
    are checked against them in the kernels section) instead of the loop of torch products."""
    torch.manual_seed(0)
    base = Llama(ModelConfig.tiny()).eval()
    common = trainer.LoopConfig(steps=4, warmup=1, batch_size=2, grad_accum=2, lr=1e-2,
                                max_grad_norm=0.5, eval_every=2, log_every=2)
    jobs = _multi_jobs(common)
    multi, hist = multi_train.train_together(copy.deepcopy(base), jobs, log=lambda s: None,
                                             gathered=gathered)
    kind = multi_train.GatheredLoRA if gathered else multi_train.SegmentedLoRA
    assert multi.modules and all(type(m) is kind for m in multi.modules)
    for job in jobs:
        torch.manual_seed(job.cfg.seed)
        net, lcfg = trainer.prepare(copy.deepcopy(base), job.cfg)
        alone = trainer.train(net, job.examples, job.cfg, lambda s: None, job.val)
        assert np.allclose(alone["losses"], hist[job.name]["losses"], atol=1e-5), job.name
        assert np.allclose(alone["val_losses"], hist[job.name]["val_losses"], atol=1e-5)
        layers = lora_layers(net)
        assert set(layers) == set(multi.layers[job.name])
        for site, m in layers.items():
            got = multi.layers[job.name][site]
            for which in ("lora_A", "lora_B"):
                assert torch.allclose(getattr(m, which).weight, getattr(got, which).weight, atol=1e-5)
        multi.save(job.name, str(tmp_path / job.name))
        fresh = copy.deepcopy(base)
        assert load_adapter(fresh, str(tmp_path / job.name)).r == MULTI[job.name]["rank"]
        tokens = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            assert torch.allclose(fresh.eval()(tokens), net.eval()(tokens), atol=1e-5)
    assert hist["small"]["losses"] != hist["long"]["losses"]


def test_a_joint_run_resumes_to_the_losses_of_an_uninterrupted_one(tmp_path):
    """checkpoint-2 holds every adapter (PEFT files, AdamW, dropout generator, losses); resuming
    from it gives the losses and weights of a run that never stopped."""
    torch.manual_seed(0)
    base = Llama(ModelConfig.tiny()).eval()
    common = trainer.LoopConfig(steps=4, warmup=1, batch_size=2, lr=1e-2, save_every=2, log_every=4)
    whole, hist = multi_train.train_together(copy.deepcopy(base), _multi_jobs(common),
                                             str(tmp_path), log=lambda s: None)
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == sorted(MULTI)
    resumed, rhist = multi_train.train_together(copy.deepcopy(base), _multi_jobs(common),
                                                resume=str(tmp_path / "checkpoint-2"), log=lambda s: None)
    for name in MULTI:
        assert np.allclose(hist[name]["losses"], rhist[name]["losses"], atol=1e-6)
        for site, pair in whole.layers[name].items():
            assert torch.allclose(pair.lora_B.weight, resumed.layers[name][site].lora_B.weight, atol=1e-6)


@pytest.mark.parametrize("spec, words", [
    ("a.jsonl:rank=8,targets=q,v", None),
    ("a.jsonl:rank=0", "rank=0 must be at least 1"),
    ("a.jsonl:rank=two", "rank='two' is not int"),
    ("a.jsonl:colour=red", "unknown key 'colour'"),
    ("a.jsonl:targets=q,x", "targets='q,x' must name projections"),
])
def test_multi_adapter_specs_parse_or_are_refused_by_name(spec, words):
    try:
        path, options = multi_train.parse_spec(spec)
        multi_train.make_job("a", trainer.LoopConfig(), options, _rows(0, 2, 3), where=f"--data {spec}")
    except multi_train.SpecError as e:
        assert words is not None and words in str(e) and "--data a.jsonl" in str(e), str(e)
        return
    assert words is None and path == "a.jsonl" and options == {"rank": 8, "targets": "q,v"}


def test_two_adapters_of_one_name_are_refused():
    jobs = [multi_train.make_job("a", trainer.LoopConfig(), {}, _rows(0, 2, 3)) for _ in range(2)]
    with pytest.raises(multi_train.SpecError, match="names given twice: a"):
        multi_train.train_together(Llama(ModelConfig.tiny()), jobs, log=lambda s: None)


def test_train_py_trains_one_adapter_per_data_file_in_one_batch(tmp_path, monkeypatch):
    """`--data a.jsonl --data b.jsonl:name=beta,rank=8,targets=q,k,v`: one run, two adapters,
    each with its own validation losses and its own PEFT directory of its rank and targets."""
    base, tok, _ = tiny_setup()
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    a, b = jsonl(tmp_path / "a.jsonl", PAIRS * 2), jsonl(tmp_path / "b.jsonl", PAIRS[:2] * 4)
    cfg = train.TrainConfig(data=[str(a), f"{b}:name=beta,rank=8,targets=q,k,v"], steps=4,
                            out=str(tmp_path / "out"), batch_size=2, warmup=1, val_fraction=0.25,
                            eval_every=2, log_every=100)
    results = train.main(cfg, log=lambda s: None)
    assert [r["name"] for r in results["runs"]] == ["a", "beta"]
    for row, r, targets in zip(results["runs"], (4, 8), (["q_proj", "v_proj"], ["k_proj", "q_proj", "v_proj"])):
        lcfg, _ = read_adapter(tmp_path / "out" / row["name"] / "adapter")
        assert lcfg.r == r and sorted(lcfg.targets) == targets
        assert [step for step, _ in row["val_losses"]] == [2, 4] and len(row["losses"]) == 4
    assert results["runs"][0]["losses"] != results["runs"][1]["losses"]
    fresh = tiny_setup()[0]                       # the run wrapped `base` in place: a new copy
    merged = copy.deepcopy(fresh)
    lora.load_adapter(merged, tmp_path / "out" / "beta" / "adapter")
    lora.merge_lora(merged)
    engine = E.Engine(fresh, None, pool_pages=200)
    engine.add_adapter("beta", str(tmp_path / "out" / "beta" / "adapter"))   # served like any other
    assert engine.generate([[5, 6, 7]], ["beta"], 6) == [merged.generate([[5, 6, 7]], 6)[0]]


def test_repeatable_flags_parse_from_the_command_line(tmp_path):
    """--data and --ignore-config-key given several times reach the config as lists (and count
    as given, so --preset does not override them)."""
    cfg = train.parse_args(["--data", "a.jsonl", "--data", "b.jsonl:rank=8,targets=q,v",
                            "--ignore-config-key", "foo", "--out", str(tmp_path)])
    assert cfg.data == ["a.jsonl", "b.jsonl:rank=8,targets=q,v"] and cfg.ignore_config_key == ["foo"]
    assert {"data", "ignore_config_key", "device"} <= train.given_flags(
        ["--data", "a.jsonl", "--ignore-config-key", "foo", "--device", "cpu"])

def test_plot_without_matplotlib_is_a_usage_error_before_any_work(monkeypatch, capsys, no_model):
    import figures
    monkeypatch.setattr(figures.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--plot", "--steps", "1"])
    assert stopped.value.code == 2 and "--plot draws with matplotlib" in capsys.readouterr().err

def test_e2e_adapters_trained_together_are_scored_as_their_saved_adapters(tmp_path, monkeypatch):
    """--task e2e --adapters 2: two seeds in one batch, each decoded through the segments of the
    joint model; its predictions and BLEU equal those of its saved PEFT directory loaded alone."""
    base, tok, _ = tiny_setup()
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (copy.deepcopy(base), tok))
    data = e2e_folder(tmp_path, devset=GOOD_CSV, testset_w_refs=GOOD_CSV)
    cfg = train.TrainConfig(e2e_dir=str(data), out=str(tmp_path / "out"), adapters=2, steps=3,
                            warmup=1, batch_size=2, lr=3e-2, beam=1, max_new_tokens=8, no_baseline=True)
    results = train.main(cfg, log=lambda s: None)
    groups = e2e.group_refs(e2e.read_e2e(str(data / "testset_w_refs.csv")))
    assert [(r["name"], r["seed"]) for r in results["runs"]] == [("e2e-0", 0), ("e2e-1", 1)]
    outputs = []
    for row in results["runs"]:
        net = copy.deepcopy(base)
        lora.load_adapter(net, row["checkpoint"])
        outs, metrics = train.evaluate(net.eval(), tok, groups, cfg, log=lambda s: None)
        assert (tmp_path / "out" / row["name"] / "predictions.txt").read_text().splitlines() == outs
        assert row["BLEU"] == metrics["BLEU"]
        outputs.append(outs)
    assert outputs[0] != outputs[1]

@pytest.mark.parametrize("specs, words", [
    (["{a}", "{a}"], "adapter names given twice: a"),
    (["{a}", "{a}:rank=0,name=b"], "--data {a}: rank=0 must be at least 1"),
    (["{a}", "{a}:name=b,rank"], "'rank' is not key=value"),
    (["{a}", "{a}:name=b,colour=red"], "unknown key 'colour'"),
    (["{a}", "{empty}:name=b"], "empty.jsonl: no records"),
    (["{a}", "{bad}:name=b"], "bad.jsonl, line 2: not JSON"),
])
def test_bad_multi_adapter_runs_are_refused_before_any_model_work(tmp_path, no_model, specs, words):
    paths = {"a": jsonl(tmp_path / "a.jsonl", PAIRS), "empty": tmp_path / "empty.jsonl",
             "bad": tmp_path / "bad.jsonl"}
    paths["empty"].write_text("\n")
    paths["bad"].write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    cfg = train.TrainConfig(data=[s.format(**paths) for s in specs], out=str(tmp_path / "out"))
    with pytest.raises((train.UsageError, sft_data.RecordError), match=re.escape(words.format(**paths))):
        train.main(cfg, log=lambda s: None)


# ------------------------------------------------------------------------------------ metrics

def test_tokenize_13a():
    assert e2e.tokenize_13a("Hello, world. It costs £20-25, or 3.5!") == \
        ["Hello", ",", "world", ".", "It", "costs", "£20", "-", "25", ",", "or", "3.5", "!"]
    assert e2e.tokenize_13a("It's A&amp;B", lowercase=True) == ["it's", "a", "&", "b"]   # ' is not split


def test_bleu_perfect_and_hand_computed():
    refs = [["the cat is on the mat today", "there is a cat on the mat"], ["a b c d e"]]
    assert e2e.bleu(["there is a cat on the mat", "a b c d e"], refs) == pytest.approx(100.0)
    # hyp "the cat sat on the mat today" vs ref 1: p1 6/7, p2 4/6, p3 2/5, p4 1/4; equal lengths, BP 1
    got = e2e.bleu(["the cat sat on the mat today"], [["the cat is on the mat today"]])
    assert got == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    upper = e2e.bleu(["The Cat sat on the mat today"], [["the cat is on the mat today"]], lowercase=True)
    assert upper == pytest.approx(got)


def test_bleu_brevity_penalty_uses_closest_reference_shorter_on_ties():
    # 4 words, references of 6 and 8: r = 6, BP = exp(1 - 6/4), every precision 1
    assert e2e.bleu(["a b c d"], [["a b c d e f", "a b c d e f g h"]]) == pytest.approx(100 * math.exp(-0.5))
    # 5 words, references of 4 and 6 are equally close: the shorter one (4) is used, so no penalty
    assert e2e.bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx(100.0)


def test_nist_hand_computed():
    # one reference "a b": Info(a) = Info(b) = log2(2/1) = 1, Info(a b) = log2(1/1) = 0 -> 2/2 + 0/1
    assert e2e.nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # "a b" against "a b c": unigram info log2(3) each -> log2(3); length ratio 2/3 gives penalty 0.5
    assert e2e.nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    f = 2.44 * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)
    assert e2e.rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx(100 * f)
    assert e2e.rouge_l(["a b c d"], [["a c d e f", "a b c d"]]) == pytest.approx(100.0)
    assert e2e.lcs(list("abcbdab"), list("bdcaba")) == 4


def test_cider_hand_computed():
    # two MRs with disjoint references: every idf is log 2, identical vectors have cosine 1 -> 10
    refs = [["w x y z"], ["p q r s"]]
    assert e2e.cider(["w x y z", "p q r s"], refs) == pytest.approx(10.0)
    assert e2e.cider(["w x y z", "k l m n"], refs) == pytest.approx(5.0)
    # one extra unseen word k (idf log 2 as well): cosines per n are 4/(2 sqrt 5), 3/(2 sqrt 3),
    # 2/(sqrt 3 sqrt 2), 1/sqrt 2, times the length penalty exp(-1^2 / (2 * 6^2))
    cosines = [2 / math.sqrt(5), math.sqrt(3) / 2, math.sqrt(2 / 3), 1 / math.sqrt(2)]
    first = 10 * math.exp(-1 / 72) * sum(cosines) / 4
    assert e2e.cider(["w x y z k", "p q r s"], refs) == pytest.approx((first + 10) / 2)


def test_main_sweep_writes_results_for_every_cell(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    data = tmp_path / "e2e"
    data.mkdir()
    rows = "mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS)
    (data / "devset.csv").write_text(rows)
    (data / "testset_w_refs.csv").write_text(rows)
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    cfg = train.TrainConfig(e2e_dir=str(data), out=str(tmp_path / "out"), sweep=True, steps=1, batch_size=2,
                            eval_limit=2, baseline_limit=1, max_new_tokens=4)
    lines = []
    results = train.main(cfg, log=lines.append)
    grid = [(r["rank"], r["targets"]) for r in results["runs"]]
    assert grid == [(r, t) for t in ("q", "q,v", "q,k,v,o") for r in (1, 2, 4, 8, 64)]
    assert results["train_split"] == "dev" and results["test_mrs"] == 2 and "dev" in lines[0]
    assert results["baseline"]["method"] == "base, 1 MRs, greedy"
    assert os.path.isfile(tmp_path / "out" / "r64_qkvo" / "adapter" / "adapter_config.json")
    assert not lora_layers(base)                                      # the base model is never modified


def test_the_base_model_is_scored_greedily_whatever_beam_says(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    monkeypatch.setattr(decode, "beam_search", lambda *a: pytest.fail("the base model ran beam search"))
    cfg = train.TrainConfig(out=str(tmp_path), beam=4, max_new_tokens=5, baseline_limit=2)
    row = train.score_baseline(base, tok, [(mr, [ref]) for mr, ref in PAIRS], cfg, log=lambda s: None)
    greedy = [decode.clean_output(tok, ids)
              for ids in base.generate([tok.encode(f"{mr}\n") for mr, _ in PAIRS[:2]], 5, eos_id=tok.eos_id)]
    assert (tmp_path / "predictions_base.txt").read_text() == "\n".join(greedy) + "\n"
    assert row["method"] == "base, 2 MRs, greedy"


def test_main_scores_a_saved_adapter_like_the_run_that_made_it(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    data = tmp_path / "e2e"
    data.mkdir()
    (data / "testset_w_refs.csv").write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS))
    (data / "trainset.csv").write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS))
    monkeypatch.setattr(train, "load_model", lambda path, ignore_keys=(): (base, tok))
    common = dict(e2e_dir=str(data), steps=3, batch_size=2, lr=3e-2, max_new_tokens=6, no_baseline=True)
    trained = train.main(train.TrainConfig(out=str(tmp_path / "a"), **common), log=lambda s: None)
    loaded = train.main(train.TrainConfig(out=str(tmp_path / "b"), adapter=str(tmp_path / "a" / "adapter"), **common),
                        log=lambda s: None)
    assert trained["train_split"] == "train"
    assert (tmp_path / "a" / "predictions.txt").read_text() == (tmp_path / "b" / "predictions.txt").read_text()
    run, again = trained["runs"][0], loaded["runs"][0]
    assert (again["rank"], again["targets"], again["trainable"]) == (4, "q,v", run["trainable"])
    assert again["BLEU"] == pytest.approx(run["BLEU"])


# ------------------------------------------------------------------------------ kernels (kernels.py, attention.py)
# Triton in its interpreter vs references vs dense math

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2)}


def make_lora(H, out_dim, ranks, dtype, seed=0, free_pages=37):
    """Adapter slots with the given ranks (slot 0 = base model, rank 0): A [r, H] and B [O, r]
    made first, then written row by row into shuffled pages of a pool whose other pages (KV or
    free) hold random numbers, so that reading a wrong page gives a wrong answer."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * sum(ranks)
    pool = torch.randn(n + free_pages, H, generator=g).to(dtype)
    page_ids = torch.randperm(n + free_pages, generator=g)[:n].int()
    # the A and B^T blocks of all slots lie in page_ids in a shuffled order
    blocks = [(s, m) for s in range(len(ranks)) for m in "AB"]
    a_start, b_start, off = [0] * len(ranks), [0] * len(ranks), 0
    for i in torch.randperm(len(blocks), generator=g).tolist():
        s, m = blocks[i]
        (a_start if m == "A" else b_start)[s] = off
        off += ranks[s]
    A = [(torch.randn(r, H, generator=g) / H ** 0.5).to(dtype) for r in ranks]
    B = [(torch.randn(out_dim, r, generator=g) / max(r, 1) ** 0.5).to(dtype) for r in ranks]
    for s, r in enumerate(ranks):
        pool[page_ids[a_start[s]:a_start[s] + r].long()] = A[s]
        pool[page_ids[b_start[s]:b_start[s] + r].long(), :out_dim] = B[s].T
    i32 = dict(dtype=torch.int32, device=DEV)
    return SimpleNamespace(
        pool=pool.to(DEV), page_ids=page_ids.to(DEV), a_start=torch.tensor(a_start, **i32),
        b_start=torch.tensor(b_start, **i32), ranks=torch.tensor(ranks, **i32),
        scales=(0.5 + torch.rand(len(ranks), generator=g)).to(DEV), A=A, B=B, out_dim=out_dim)


def dense_lora(x, ad, adapter_ids):
    """delta[t] = scale[a] x[t] A[a]^T B[a]^T in float64, zero for rank-0 slots."""
    delta = torch.zeros(x.shape[0], ad.out_dim, dtype=torch.float64)
    for t, s in enumerate(adapter_ids.tolist()):
        if ad.ranks[s] > 0:
            xt = x[t].double().cpu()
            delta[t] = float(ad.scales[s]) * (xt @ ad.A[s].double().T) @ ad.B[s].double().T
    return delta


def segments_of(adapter_ids):
    """Sort tokens by adapter: order, seg_starts [G+1], seg_adapter [G], with an empty segment."""
    order = torch.argsort(adapter_ids.cpu(), stable=True)
    seg_adapter, counts = torch.unique_consecutive(adapter_ids.cpu()[order], return_counts=True)
    seg_adapter = torch.cat([seg_adapter[:1], seg_adapter])      # an empty segment first
    counts = torch.cat([torch.zeros(1, dtype=counts.dtype), counts])
    seg_starts = torch.cat([torch.zeros(1, dtype=counts.dtype), counts.cumsum(0)])
    return order.to(DEV), seg_starts.int().to(DEV), seg_adapter.int().to(DEV)


def plan_of(ad, seg_starts, seg_adapter, max_rank, per_token):
    """kernels.plan_lora over the tables of make_lora."""
    return kernels.plan_lora(ad.pool, ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales,
                             seg_starts, seg_adapter, max_rank, per_token=per_token)


def one_each(adapter_ids):
    """MBGMV's segments: every token its own (seg_starts [N+1], seg_adapter [N])."""
    return torch.arange(len(adapter_ids) + 1, dtype=torch.int32, device=DEV), adapter_ids


RANKS = [0, 1, 5, 128, 17, 16, 3]           # slot 0: base model; 1..128 mixed in one launch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dim", [72, 24])  # q/o_proj (O = H) and k/v_proj (O = kv_dim < H)
def test_shrink_expand_equal_dense_lora(dtype, out_dim):
    H, N = 72, 23                              # not multiples of any block size
    ad = make_lora(H, out_dim, RANKS, dtype, seed=out_dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, generator=g).to(dtype).to(DEV)
    ids = torch.randint(0, len(RANKS), (N,), generator=g, dtype=torch.int32)
    ids[:3] = torch.tensor([0, 3, 1], dtype=torch.int32)      # base tokens and rank 128 present
    ids = ids.to(DEV)
    plan = plan_of(ad, *one_each(ids), 128, per_token=True)     # MBGMV: tokens in any order
    z = kernels.lora_shrink(x, ad.pool, plan, use_triton=True)
    torch.testing.assert_close(z, kernels.lora_shrink_ref(x, ad.pool, plan), atol=1e-5, rtol=1e-5)
    delta = kernels.lora_expand(z, ad.pool, plan, out_dim, use_triton=True)
    assert delta.dtype == dtype and delta.shape == (N, out_dim)
    torch.testing.assert_close(delta.double().cpu(), dense_lora(x, ad, ids), **TOL[dtype])
    torch.testing.assert_close(delta, kernels.lora_expand_ref(z, ad.pool, plan, out_dim),
                               **TOL[dtype])
    assert (delta[ids == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_agree_with_per_token(dtype):
    H, N, O = 80, 30, 70                     # O > BLOCK_O, H > BLOCK_H
    ad = make_lora(H, O, [0, 33, 2, 20], dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([1] * 22 + [0] * 3 + [2] * 3 + [3] * 2, dtype=torch.int32)  # 22 > BLOCK_T
    ids = ids[torch.randperm(N, generator=g)].to(DEV)
    x = torch.randn(N, H, generator=g).to(dtype).to(DEV)
    order, seg_starts, seg_adapter = segments_of(ids)
    xs = x[order]
    per_token = plan_of(ad, *one_each(ids), 40, per_token=True)
    segments = plan_of(ad, seg_starts, seg_adapter, 40, per_token=False)
    assert (per_token.tiles.tokens, segments.tiles.tokens) == (1, 16)   # MBGMV and MBGMM tiles
    z_tok = kernels.lora_shrink(x, ad.pool, per_token, use_triton=True)
    z_seg = kernels.lora_shrink(xs, ad.pool, segments, use_triton=True)
    torch.testing.assert_close(z_seg, z_tok[order], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z_seg, kernels.lora_shrink_ref(xs, ad.pool, segments),
                               atol=1e-4, rtol=1e-5)
    d_tok = kernels.lora_expand(z_tok, ad.pool, per_token, O, use_triton=True)
    d_seg = kernels.lora_expand(z_seg, ad.pool, segments, O, use_triton=True)
    torch.testing.assert_close(d_seg, d_tok[order], **TOL[dtype])
    torch.testing.assert_close(d_seg, kernels.lora_expand_ref(z_seg, ad.pool, segments, O),
                               **TOL[dtype])
    torch.testing.assert_close(d_seg.double().cpu(), dense_lora(xs, ad, ids[order]), **TOL[dtype])


def test_every_output_element_is_written():
    """Outputs handed in NaN-filled: rank-0 tokens, rows past the rank and masked tails must all
    be overwritten (with zeros where nothing is computed)."""
    H, N, O = 24, 9, 20
    ad = make_lora(H, O, [0, 3, 18], torch.float32, seed=4)
    ids = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0, 0], dtype=torch.int32, device=DEV)
    x = torch.randn(N, H, device=DEV)
    nan = lambda *shape: torch.full(shape, float("nan"), device=DEV)   # noqa: E731
    per_token = plan_of(ad, *one_each(ids), 20, per_token=True)
    z = kernels.lora_shrink(x, ad.pool, per_token, out=nan(N, 20), use_triton=True)
    d = kernels.lora_expand(z, ad.pool, per_token, O, out=nan(N, O), use_triton=True)
    order, seg_starts, seg_adapter = segments_of(ids)
    segments = plan_of(ad, seg_starts, seg_adapter, 20, per_token=False)
    zs = kernels.lora_shrink(x[order], ad.pool, segments, out=nan(N, 20), use_triton=True)
    ds = kernels.lora_expand(zs, ad.pool, segments, O, out=nan(N, O), use_triton=True)
    for out in (z, d, zs, ds):
        assert torch.isfinite(out).all()
    assert (z[ids == 0] == 0).all() and (z[ids == 1, 3:] == 0).all() and (d[ids == 0] == 0).all()
    kv = make_kv([4, 1], n_heads=4, n_kv_heads=2, head_dim=6, dtype=torch.float32)
    a = attention.paged_attention_decode(kv.q[[3, 4]], kv.pool, kv.block_table, kv.lens,
                                       2, out=nan(2, 4, 6), use_triton=True)
    p = attention.paged_attention_prefill(kv.q, kv.pool, kv.block_table, kv.seq_ids, kv.positions,
                                        2, out=nan(5, 4, 6), use_triton=True)
    assert torch.isfinite(a).all() and torch.isfinite(p).all()


@pytest.mark.parametrize("per_token,dtype", [(True, torch.float32), (False, torch.float32), (False, torch.bfloat16)])
@pytest.mark.parametrize("consecutive", [True, False])
def test_checked_step_equals_dense_lora_on_cpu_and_in_triton(per_token, dtype, consecutive):
    """plan_lora + lora_apply (the serving path): its CPU runs read A and B^T as views of consecutive
    pages or gather shuffled ones; both, and the kernels, equal the dense formula."""
    H, O, ranks = 40, 24, [0, 3, 17, 8]
    ad = make_lora(H, O, ranks, dtype, seed=7)
    if consecutive:   # the same numbers moved so that each slot's A rows, then its B^T rows, are adjacent pages
        order = torch.cat([ad.page_ids[st:st + r].long() for s, r in enumerate(ranks)
                           for st in (int(ad.a_start[s]), int(ad.b_start[s]))])
        pool = torch.cat([ad.pool[order], torch.randn(5, H, device=DEV).to(dtype)])
        ad.page_ids = torch.arange(len(order), dtype=torch.int32, device=DEV)
        starts = torch.tensor([0] + [2 * r for r in ranks[:-1]]).cumsum(0).int().to(DEV)
        ad.pool, ad.a_start, ad.b_start = pool, starts, starts + ad.ranks
    ids = torch.tensor([2, 2, 0, 1, 1, 1, 3, 2, 2], dtype=torch.int32, device=DEV)   # sorted runs and a repeat
    x = torch.randn(len(ids), H, device=DEV).to(dtype)
    if per_token:
        segments = torch.arange(len(ids) + 1, dtype=torch.int32, device=DEV), ids
    else:
        segments = (torch.tensor([0, 2, 3, 6, 7, 9], dtype=torch.int32, device=DEV),
                    torch.tensor([2, 0, 1, 3, 2], dtype=torch.int32, device=DEV))
    plan = plan_of(ad, *segments, 17, per_token=per_token)
    assert [(t0, t1) for t0, t1, *_ in plan.runs] == [(0, 2), (3, 6), (6, 7), (7, 9)]   # base run skipped
    assert all(isinstance(rows, slice) == consecutive for run in plan.runs for rows in run[2:4])
    want = dense_lora(x, ad, ids)
    for use_triton in (False, True):
        delta = kernels.lora_apply(x, ad.pool, plan, O, use_triton=use_triton)
        assert delta.dtype == dtype
        torch.testing.assert_close(delta.double(), want, **TOL[dtype])
    with pytest.raises(ValueError, match=r"page_ids\[\d+\] = \d+ is outside \[0, 30\)"):   # checked once, here
        kernels.plan_lora(ad.pool[:30], ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales, *segments, 17)
    with pytest.raises(ValueError, match="does not fit a plan of 9 tokens"):
        kernels.lora_apply(x[:5], ad.pool, plan, O)


def make_wide_lora(H, in_dim, out_dim, ranks, dtype, seed=0, free_pages=23):
    """make_lora for rows wider than a page: A [r, I] and B^T [r, O] rows cut into chunks of H
    numbers (the last zero-padded), every chunk on a page of its own, all pages shuffled among
    random ones; tables as paging.py builds them (A row j, chunk c: page_ids[a_start + j C_A + c])."""
    g = torch.Generator().manual_seed(seed)
    ca, cb = -(-in_dim // H), -(-out_dim // H)
    n = (ca + cb) * sum(ranks)
    pool = torch.randn(n + free_pages, H, generator=g).to(dtype)
    page_ids = torch.randperm(n + free_pages, generator=g)[:n].int()
    A = [(torch.randn(r, in_dim, generator=g) / in_dim ** 0.5).to(dtype) for r in ranks]
    B = [(torch.randn(out_dim, r, generator=g) / max(r, 1) ** 0.5).to(dtype) for r in ranks]
    a_start, b_start, off = [], [], 0
    for r, a, b in zip(ranks, A, B):
        for rows, c, starts in ((a, ca, a_start), (b.T, cb, b_start)):   # [r, I], then [r, O]
            starts.append(off)
            chunks = torch.zeros(r, c * H, dtype=dtype)
            chunks[:, :rows.shape[1]] = rows
            pool[page_ids[off:off + r * c].long()] = chunks.reshape(r * c, H)      # [r C, H]
            off += r * c
    i32 = dict(dtype=torch.int32, device=DEV)
    return SimpleNamespace(
        pool=pool.to(DEV), page_ids=page_ids.to(DEV), a_start=torch.tensor(a_start, **i32),
        b_start=torch.tensor(b_start, **i32), ranks=torch.tensor(ranks, **i32),
        scales=(0.5 + torch.rand(len(ranks), generator=g)).to(DEV), A=A, B=B, out_dim=out_dim,
        chunks=(ca, cb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,in_dim,out_dim", [(32, 32, 88), (32, 88, 32), (80, 200, 200)])
def test_rows_over_several_pages_equal_dense_lora(H, in_dim, out_dim, dtype):
    """gate/up (O = F), down (I = F) and both wide, F not a multiple of H (88 = 2.75 x 32, 200 =
    2.5 x 80: last chunks part-filled, H not a multiple of the tiles): the Triton kernels through
    the interpreter, their references and the CPU path equal the dense formula, per token (MBGMV)
    and per segment (MBGMM); a narrower x reads the first numbers of A's rows (a TP share)."""
    ranks, N = [0, 3, 17, 1], 19
    ad = make_wide_lora(H, in_dim, out_dim, ranks, dtype, seed=in_dim + out_dim)
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([1, 2, 2, 0] + torch.randint(0, 4, (N - 4,), generator=g).tolist(),
                       dtype=torch.int32, device=DEV)
    x = torch.randn(N, in_dim, generator=g).to(dtype).to(DEV)
    order, seg_starts, seg_adapter = segments_of(ids)
    for xs, idx, segments, per_token in ((x, ids, one_each(ids), True),
                                         (x[order], ids[order], (seg_starts, seg_adapter), False)):
        plan = kernels.plan_lora(ad.pool, ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales,
                                 *segments, 17, per_token=per_token, a_chunks=ad.chunks[0],
                                 b_chunks=ad.chunks[1])
        z = kernels.lora_shrink(xs, ad.pool, plan, use_triton=True)
        torch.testing.assert_close(z, kernels.lora_shrink_ref(xs, ad.pool, plan), atol=1e-4, rtol=1e-5)
        want = dense_lora(xs, ad, idx)
        for delta in (kernels.lora_expand(z, ad.pool, plan, out_dim, use_triton=True),
                      kernels.lora_apply(xs, ad.pool, plan, out_dim, use_triton=False)):
            assert delta.shape == (N, out_dim) and delta.dtype == dtype
            torch.testing.assert_close(delta.double().cpu(), want, **TOL[dtype])
        share = in_dim // 2 + 1                               # x of a device's first I/2 + 1 inputs
        z_share = kernels.lora_shrink(xs[:, :share].contiguous(), ad.pool, plan, use_triton=True)
        for t, s in enumerate(idx.tolist()):
            want_z = xs[t, :share].double().cpu() @ ad.A[s][:, :share].double().T      # [r]
            torch.testing.assert_close(z_share[t, :ranks[s]].double().cpu(), want_z, **TOL[dtype])
    with pytest.raises(ValueError, match=rf"out_dim must be an int in \[1, {ad.chunks[1] * H}\]"):
        kernels.lora_expand(z, ad.pool, plan, ad.chunks[1] * H + 1)
    with pytest.raises(ValueError, match=rf"b_start \+ {ad.chunks[1] + 1} \* ranks\[2\] = \d+ is outside"):
        kernels.plan_lora(ad.pool, ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales, *one_each(ids),
                          17, a_chunks=ad.chunks[0], b_chunks=ad.chunks[1] + 1)   # tables of other widths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,in_dim,out_dim", [(32, 32, 24), (32, 88, 32), (32, 32, 88)])
def test_int8_rows_equal_the_float_path_on_the_dequantized_adapter(H, in_dim, out_dim, dtype):
    """Every page of a pool quantized per row (quant.quantize_rows): the int8 kernels through the
    interpreter, their references and the CPU path equal the float32 path on the dequantized pool
    q s (float32 tolerance; bfloat16 activations: one rounding of the output), per token and per
    segment, rows on one page (q, k, v, o) and over several (down's A, gate's and up's B^T)."""
    ranks, N = [0, 3, 17, 1], 19
    ad = make_wide_lora(H, in_dim, out_dim, ranks, torch.float32, seed=in_dim + 2 * out_dim)
    q, row_scale = quantize_rows(ad.pool)                        # [P, H] int8, [P]
    dequantized = q.float() * row_scale[:, None]                       # [P, H] float32
    assert ((dequantized - ad.pool).abs() <= row_scale[:, None] / 2 + 1e-7).all()   # half a step
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([1, 2, 2, 0] + torch.randint(0, 4, (N - 4,), generator=g).tolist(),
                       dtype=torch.int32, device=DEV)
    x = torch.randn(N, in_dim, generator=g).to(dtype).to(DEV)
    order, seg_starts, seg_adapter = segments_of(ids)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    for xs, segments, per_token in ((x, one_each(ids), True),
                                    (x[order], (seg_starts, seg_adapter), False)):
        plan = kernels.plan_lora(q, ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales,
                                 *segments, 17, per_token=per_token, a_chunks=ad.chunks[0],
                                 b_chunks=ad.chunks[1])
        z_want = kernels.lora_shrink_ref(xs.float(), dequantized, plan)
        want = kernels.lora_apply(xs.float(), dequantized, plan, out_dim, use_triton=False)
        z = kernels.lora_shrink(xs, q, plan, row_scale=row_scale, use_triton=True)
        torch.testing.assert_close(z, z_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernels.lora_shrink_ref(xs, q, plan, row_scale), z_want,
                                   atol=1e-5, rtol=1e-5)
        for delta in (kernels.lora_expand(z, q, plan, out_dim, row_scale=row_scale, dtype=dtype,
                                          use_triton=True),
                      kernels.lora_expand_ref(z, q, plan, out_dim, row_scale, dtype),
                      kernels.lora_apply(xs, q, plan, out_dim, use_triton=False, row_scale=row_scale)):
            assert delta.shape == (N, out_dim) and delta.dtype == dtype
            torch.testing.assert_close(delta.float(), want, **tol)
    with pytest.raises(ValueError, match="int8 rows need the activations' dtype"):
        kernels.lora_expand(z, q, plan, out_dim, row_scale=row_scale)
    with pytest.raises(ValueError, match=r"row_scale must be 1-D with \d+ rows"):
        kernels.lora_shrink(xs, q, plan, row_scale=row_scale[:-1])
    with pytest.raises(ValueError, match="pool_l is torch.int8"):
        kernels.lora_shrink(xs, q, plan)                                 # int8 rows, no scales


@pytest.mark.parametrize("I,O", [(40, 24), (24, 88)])    # q/v-like and gate/up-like widths
def test_segment_lora_forward_and_backward_equal_autograd_on_the_dense_formula(I, O):
    """kernels_train.segment_lora (SegmentLoRA: shrink, expand and their backward, the segment-wise
    outer product) through Triton's interpreter and through the references: delta, dL/dx, dL/dA_s
    and dL/dB_s equal autograd on scale_s (x A_s^T) B_s^T per segment, for 3 adapters of ranks 3,
    17 and 5 in segments of 20, 7 and 9 tokens (longer than a tile, shorter) among base-model
    segments; an adapter in two segments is refused."""
    g = torch.Generator().manual_seed(I + O)
    ranks, scales = [3, 17, 5], [0.5, 2.0, 1.5]
    lengths, slots = [7, 0, 20, 5, 9], [2, 0, 1, 0, 3]
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()   # noqa: E731
    As, Bs = [leaf(r, I) for r in ranks], [leaf(O, r) for r in ranks]
    x, w = leaf(sum(lengths), I), torch.randn(sum(lengths), O, generator=g)

    def dense():
        parts, t = [], 0
        for n, s in zip(lengths, slots):
            parts.append(scales[s - 1] * (x[t:t + n] @ As[s - 1].T) @ Bs[s - 1].T if s
                         else torch.zeros(n, O))
            t += n
        return torch.cat(parts)

    def run(fn):
        for p in [x, *As, *Bs]:
            p.grad = None
        delta = fn()
        (delta * w).sum().backward()
        return [delta.detach()] + [p.grad.clone() for p in [x, *As, *Bs]]

    want = run(dense)
    for use_triton in (False, True):
        got = run(lambda: kernels_train.segment_lora(x, lengths, slots, scales, As, Bs, use_triton))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="each adapter's tokens must be one segment"):
        kernels_train.segment_lora(x, [10, 31], [1, 1], scales, As, Bs)


def test_bad_arguments_raise_clear_errors():
    ad = make_lora(16, 16, [0, 2, 3], torch.float32, seed=5)
    x, ids = torch.randn(4, 16, device=DEV), torch.tensor([0, 1, 2, 1], device=DEV)
    plan = lambda **kw: kernels.plan_lora(**{**dict(   # noqa: E731
        pool_l=ad.pool, page_ids=ad.page_ids, a_start=ad.a_start, b_start=ad.b_start,
        ranks=ad.ranks, scales=ad.scales, seg_starts=one_each(ids)[0], seg_adapter=ids,
        max_rank=4, per_token=True), **kw})
    with pytest.raises(ValueError, match=r"seg_adapter\[2\] = 7"):
        plan(seg_adapter=torch.tensor([0, 1, 7, 1], device=DEV))
    with pytest.raises(ValueError, match=r"page_ids\[1\] = 999"):
        plan(page_ids=torch.cat([ad.page_ids[:1], ad.page_ids.new_tensor([999]),
                                 ad.page_ids[2:]]))
    with pytest.raises(ValueError, match=r"a_start \+ ranks\[2\] = 11"):   # 10 pages, rank 3
        plan(a_start=torch.tensor([0, 0, 8], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match=r"ranks\[2\] = 3"):
        plan(max_rank=2)
    with pytest.raises(ValueError, match=r"x \(4, 16\) torch.float32 does not fit .*float16"):
        kernels.lora_shrink(x, ad.pool.half(), plan())
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.lora_shrink(x[None], ad.pool, plan())
    with pytest.raises(ValueError, match="does not fit a plan of 3 tokens"):   # segments end early
        kernels.lora_shrink(x, ad.pool, plan(seg_starts=torch.tensor([0, 2, 3], device=DEV),
                                             seg_adapter=torch.tensor([1, 2], device=DEV)))
    with pytest.raises(ValueError, match="out_dim"):
        kernels.lora_expand(torch.zeros(4, 4, device=DEV), ad.pool, plan(), 17)
    kv = make_kv([4, 1], n_heads=4, n_kv_heads=2, head_dim=6, dtype=torch.float32)
    q2 = kv.q[[3, 4]]
    with pytest.raises(ValueError, match=r"block_table\[0, 1, 0\] = 50"):
        bad = kv.block_table.clone()
        bad[0, 1, 0] = 50
        attention.paged_attention_decode(q2, kv.pool, bad, kv.lens, 2)
    with pytest.raises(ValueError, match=r"positions\[1\] = 8 is outside \[0, 4\)"):   # seq_lens 9
        attention.paged_attention_decode(q2, kv.pool, kv.block_table, kv.lens.new_tensor([4, 9]), 2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        attention.paged_attention_decode(q2, kv.pool, kv.block_table, kv.lens, 3)
    with pytest.raises(ValueError, match=r"seq_ids\[0\] = 2"):
        attention.paged_attention_prefill(kv.q, kv.pool, kv.block_table, kv.seq_ids + 2,
                                        kv.positions, 2)


def make_kv(lens, n_heads, n_kv_heads, head_dim, dtype, seed=6, free_pages=11):
    """Requests with K/V [n, nkv, D] made first, then stored through write_kv into shuffled pages
    (block_table rows also hold pages past each request's length, pointing anywhere)."""
    g = torch.Generator().manual_seed(seed)
    H, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    per_page = H // kv_dim
    blocks = max(math.ceil(n / per_page) for n in lens)
    P = 2 * blocks * len(lens) + free_pages
    pool = torch.randn(P, H, generator=g).to(dtype).to(DEV)   # stale numbers everywhere
    block_table = torch.randperm(P, generator=g)[:2 * blocks * len(lens)]
    block_table = block_table.view(len(lens), blocks, 2).int().to(DEV)
    seq_ids = torch.cat([torch.full((n,), r) for r, n in enumerate(lens)]).to(DEV)
    positions = torch.cat([torch.arange(n) for n in lens]).to(DEV)
    N = positions.shape[0]
    k = torch.randn(N, kv_dim, generator=g).to(dtype).to(DEV)
    v = torch.randn(N, kv_dim, generator=g).to(dtype).to(DEV)
    attention.write_kv(pool, k, v, block_table, seq_ids, positions)
    q = torch.randn(N, n_heads, head_dim, generator=g).to(dtype).to(DEV)
    return SimpleNamespace(pool=pool, block_table=block_table, seq_ids=seq_ids,
                           positions=positions, k=k, v=v, q=q, per_page=per_page,
                           lens=torch.tensor(lens, device=DEV), n_kv_heads=n_kv_heads)


def dense_attention(kv, rows):
    """Causal GQA attention with plain matmuls, from the K/V before paging, for token rows."""
    out = []
    D, nkv = kv.q.shape[2], kv.n_kv_heads
    group = kv.q.shape[1] // nkv
    for t in rows.tolist():
        r, p = int(kv.seq_ids[t]), int(kv.positions[t])
        keys = ((kv.seq_ids == r) & (kv.positions <= p)).nonzero()[:, 0]
        K = kv.k[keys].double().view(-1, nkv, D).repeat_interleave(group, dim=1)  # [n, nh, D]
        V = kv.v[keys].double().view(-1, nkv, D).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", kv.q[t].double(), K) / math.sqrt(D)   # [nh, n]
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), V))          # [nh, D]
    return torch.stack(out)


def test_write_kv_layout_by_hand():
    kv = make_kv([5, 2], n_heads=6, n_kv_heads=2, head_dim=4, dtype=torch.float32)
    kv_dim = 8   # g = 3 tokens per page: token at position p, slot p % 3, block p // 3
    for t in range(7):
        r, p = int(kv.seq_ids[t]), int(kv.positions[t])
        k_page, v_page = kv.block_table[r, p // 3].tolist()
        assert torch.equal(kv.pool[k_page, (p % 3) * kv_dim:(p % 3 + 1) * kv_dim], kv.k[t])
        assert torch.equal(kv.pool[v_page, (p % 3) * kv_dim:(p % 3 + 1) * kv_dim], kv.v[t])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_equals_dense_causal_gqa(dtype):
    lens = [1, 7, 40]                              # 40 > BLOCK_N; none a multiple of g = 3
    kv = make_kv(lens, n_heads=6, n_kv_heads=2, head_dim=12, dtype=dtype)   # D < BLOCK_D
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    # prefill: a chunk (positions 31..39 of request 2) and two other tokens, in shuffled order
    rows = torch.tensor([0, 5] + list(range(8 + 31, 8 + 40)))                 # token rows
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(7))].to(DEV)
    pargs = (kv.pool, kv.block_table, kv.seq_ids[rows], kv.positions[rows], 2)
    pre = attention.paged_attention_prefill(kv.q[rows], *pargs, use_triton=True)
    torch.testing.assert_close(pre.double().cpu(), dense_attention(kv, rows).cpu(), **tol)
    torch.testing.assert_close(pre, attention.paged_attention_prefill_ref(kv.q[rows], *pargs), **tol)
    # decode: one query per request at a chosen position, attending to positions 0..pos
    last = torch.tensor([0, 5, 47], device=DEV)                  # positions 0, 4, 39
    seq_lens = kv.positions[last] + 1
    dargs = (kv.pool, kv.block_table, seq_lens, 2)
    dec = attention.paged_attention_decode(kv.q[last], *dargs, use_triton=True)
    torch.testing.assert_close(dec.double().cpu(), dense_attention(kv, last).cpu(), **tol)
    torch.testing.assert_close(dec, attention.paged_attention_decode_ref(kv.q[last], *dargs), **tol)
    same = (rows == 47).nonzero()[0, 0]                           # token 47 in both batches
    torch.testing.assert_close(dec[2], pre[same], atol=1e-6, rtol=1e-6)


def test_full_prefill_then_decode_agree_without_gqa():
    kv = make_kv([3, 4], n_heads=2, n_kv_heads=2, head_dim=16, dtype=torch.float32)  # g = 1
    rows = torch.arange(7, device=DEV)
    pre = attention.paged_attention_prefill(kv.q, kv.pool, kv.block_table, kv.seq_ids,
                                          kv.positions, 2, use_triton=True)
    torch.testing.assert_close(pre.double().cpu(), dense_attention(kv, rows).cpu(),
                               atol=1e-5, rtol=1e-5)
    dec = attention.paged_attention_decode(kv.q[[2, 6]], kv.pool, kv.block_table, kv.lens, 2,
                                         use_triton=True)
    torch.testing.assert_close(dec, pre[[2, 6]], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_triton", [False, True])
def test_nan_in_free_pages_page_0_and_unused_slots_reaches_no_request(use_triton):
    """Block-table padding points at page 0; page 0, every free page and every slot past a
    request's length hold NaN. Each request reads only its own positions (masked, never
    multiplied by 0), so every output is finite and equals the dense attention."""
    lens = [1, 7, 40, 5]
    kv = make_kv(lens, n_heads=6, n_kv_heads=2, head_dim=12, dtype=torch.float32)
    g, kv_dim = kv.per_page, kv.k.shape[1]
    pool = torch.cat([torch.full_like(kv.pool[:1], float("nan")), kv.pool])   # a new page 0
    table, owned = kv.block_table + 1, set()
    for r, n in enumerate(lens):
        blocks = math.ceil(n / g)
        table[r, blocks:] = 0                                  # padding, as UnifiedPool pads
        owned |= set(table[r, :blocks].flatten().tolist())
        for p in range(n, blocks * g):                         # slots past the request's length
            pool[table[r, p // g], (p % g) * kv_dim:(p % g + 1) * kv_dim] = float("nan")
    pool[[p for p in range(pool.shape[0]) if p not in owned]] = float("nan")
    last = torch.tensor([sum(lens[:r + 1]) - 1 for r in range(len(lens))], device=DEV)
    dec = attention.paged_attention_decode(kv.q[last], pool, table, kv.lens, 2, use_triton=use_triton)
    rows = torch.cat([last, torch.arange(8, 48, device=DEV)])  # a token of each + a long chunk
    pre = attention.paged_attention_prefill(kv.q[rows], pool, table, kv.seq_ids[rows],
                                          kv.positions[rows], 2, use_triton=use_triton)
    assert torch.isfinite(dec).all() and torch.isfinite(pre).all()
    torch.testing.assert_close(dec.double().cpu(), dense_attention(kv, last).cpu(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre.double().cpu(), dense_attention(kv, rows).cpu(),
                               atol=1e-5, rtol=1e-5)


def test_one_attention_plan_serves_every_layer_and_chunks_long_prompts(monkeypatch):
    """paged_attention_plan, made once per step, gives each layer's pool its own attention (the
    dense reference of that layer's K/V); prompts are split into several CPU groups when their
    padded scores exceed ATTEND_NUMBERS, with the same result; a pool of another shape is refused."""
    layers = [make_kv([1, 7, 40, 5], n_heads=6, n_kv_heads=2, head_dim=12, dtype=torch.float32,
                      seed=s) for s in (6, 6)]
    layers[1].k, layers[1].v = layers[1].k.flip(0), layers[1].v.flip(0)   # other K/V, same pages
    attention.write_kv(layers[1].pool, layers[1].k, layers[1].v, layers[1].block_table,
                     layers[1].seq_ids, layers[1].positions)
    kv, rows = layers[0], torch.arange(53, device=DEV)
    args = (kv.block_table, kv.seq_ids, kv.positions, 2, 12)
    plans = [attention.paged_attention_plan(kv.pool, *args)]
    monkeypatch.setattr(attention, "ATTEND_NUMBERS", 6 * 8 * 8)   # one prefill request per group
    plans.append(attention.paged_attention_plan(kv.pool, *args))
    assert [len(p.groups) for p in plans] == [2, 4]              # decodes, then 1 or 3 chunks
    for plan in plans:
        for layer in layers:
            out = attention.paged_attention(layer.q, layer.pool, plan)
            torch.testing.assert_close(out.double(), dense_attention(layer, rows), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit a plan of 53 tokens"):
        attention.paged_attention(kv.q, kv.pool[:-1], plans[0])


def test_attention_reads_a_page_slice_whose_width_head_dim_does_not_divide():
    """Tensor parallelism can keep a part of each page whose row stride the head dim does not
    divide (here 24 numbers of 44-number rows, head dim 8): the CPU's row view then overlaps, and
    writes and reads still equal the dense attention."""
    kv = make_kv([4, 9], n_heads=3, n_kv_heads=3, head_dim=8, dtype=torch.float32)   # g = 1
    wide = torch.full((kv.pool.shape[0], 44), float("nan"), device=DEV)
    pool = wide[:, :24]                                                  # [P, 24], row stride 44
    rows = torch.arange(13, device=DEV)
    plan = attention.paged_attention_plan(pool, kv.block_table, kv.seq_ids, kv.positions, 3, 8)
    attention.paged_attention_write(pool, kv.k, kv.v, plan)
    torch.testing.assert_close(attention.paged_attention(kv.q, pool, plan).double(),
                               dense_attention(kv, rows), atol=1e-5, rtol=1e-5)
    assert torch.isnan(wide[:, 24:]).all()                               # nothing written beyond


def test_kernel_bench_times_every_variant_on_shuffled_and_in_order_pages(capsys):
    """kernel_bench on a CPU: adapters on shuffled pages (lists of rows) or on consecutive ones
    (views of the pool, as the engine's pool allocates them); lora_apply is its own reference,
    bmm agrees with it, int8 rows differ by their rounding only."""
    for pages in ("shuffled", "in-order"):
        cfg = kernel_bench.BenchConfig(hidden=64, tokens=12, adapters=5, repeats=1, pages=pages)
        cfg.in_dim = cfg.out_dim = 64
        *_, plan = kernel_bench.random_step(cfg, torch.device("cpu"), torch.float32)
        assert all(isinstance(run[2], slice) for run in plan.runs) == (pages == "in-order")
        kernel_bench.benchmark(cfg)
    diffs = [(line.split(" ms ")[0].split("  ")[1].strip(), float(line.split("max|diff| ")[1]))
             for line in capsys.readouterr().out.splitlines() if "max|diff|" in line]
    assert [name for name, _ in diffs].count("gathered, int8 rows") == 2
    for name, diff in diffs:
        assert diff == 0 if name.startswith("gathered from") else (
            0 < diff < 0.2 if "int8" in name else diff < 1e-5), (name, diff)   # outputs ~1-2


def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills():
    """What the engine can launch (each dtype, float and int8 rows, decode and prefill tiles, shrink and expand of rows
    on one page (q, k, v, o) or over several (down's A, gate's and up's B^T), attention for head
    dims up to 128), compiled by Triton's own ptxas without a GPU: every variant for sm_90 and the bfloat16
    ones for sm_80 (all of sm_80: `python kernel_bench.py --compile`, `python attention.py`; kept out of the suite for
    time). No register spills, shared memory that fits.
    In a child process: this one runs Triton's interpreter, which cannot compile."""
    import subprocess
    import sys
    code = ("import itertools, json, torch, attention, gpu_compile, kernels, kernels_train\n"
            "print(json.dumps([(label, str(dtype), arch, gpu_compile.compile_for(k, dtype, c, arch))\n"
            "    for label, dtype, k, c in itertools.chain(kernels.kernel_variants(),\n"
            "                                              kernels_train.kernel_variants(),\n"
            "                                              attention.kernel_variants())\n"
            "    for arch in ((90, 80) if dtype == torch.bfloat16 else (90,))]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(kernels.__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.splitlines()[-1])
    assert len(compiled) == 5 * 4 * 2 + 3 * 4 + 20 + 3   # (shrink, expand) x (rows on one page,
    # over several) x 2 shapes for float rows of 3 dtypes and int8 rows beside float32 and
    # bfloat16 activations, 4 head dims, training's segment outer product of 2 dtypes: each on
    # sm_90, the bfloat16 ones also on sm_80
    assert sum("int8 rows" in label for label, *_ in compiled) == 8 + 16
    for label, dtype, arch, (regs, spilled, shared) in compiled:
        assert 0 < regs <= 255 and spilled == 0, (label, dtype, arch, regs, spilled)
        assert shared <= 99 * 1024, (label, dtype, arch, shared)   # fits every sm_80+ GPU


# ------------------------------------------------------------------------------ paging.py and scheduler.py

L, H, G = 2, 12, 3            # layers, model dim, tokens per KV page (kv_dim = 4)
KV_DIM = H // G


def peft_tensors(rank, targets, n_layers=L, seed=0):
    """Random adapter weights under PEFT keys: A [r, H], B [out, r]."""
    gen = torch.Generator().manual_seed(seed)
    out = {"q_proj": H, "k_proj": KV_DIM, "v_proj": KV_DIM, "o_proj": H, "gate_proj": 2 * H}
    tensors = {}
    for i in range(n_layers):
        for t in targets:
            key = f"base_model.model.model.layers.{i}.self_attn.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, H, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out[t], rank, generator=gen)
    return tensors


def make_adapter(name, rank, targets=("q_proj", "v_proj"), seed=0):
    cfg = LoRAConfig(r=rank, alpha=2.0 * rank, targets=tuple(targets))
    return HostAdapter.from_peft(name, cfg, peft_tensors(rank, targets, seed=seed), L)


def make_pool(n_pages, adapters=()):
    pool = UnifiedPool(PoolConfig(n_layers=L, n_pages=n_pages, dim=H, tokens_per_page=G))
    for a in adapters:
        pool.register(a)
    return pool


# ------------------------------------------------------------------------------ paging (adapters.py, paging.py)

def test_allocator_invariants_under_random_operations():
    rng, alloc, held = random.Random(0), PageAllocator(50), []   # held: (pages, owner) per allocation
    for _ in range(2000):
        if held and rng.random() < 0.45:
            alloc.free(held.pop(rng.randrange(len(held)))[0])
        else:
            n, owner = rng.randint(1, 8), rng.choice([KV, ADAPTER])
            if alloc.can_allocate(n):
                pages = alloc.allocate(n, owner)
                in_use = {p for ps, _ in held for p in ps}
                assert len(set(pages)) == n and not set(pages) & in_use and all(0 <= p < 50 for p in pages)
                held.append((pages, owner))
            else:
                with pytest.raises(PoolFullError):
                    alloc.allocate(n, owner)
        s = alloc.stats()
        assert s.used + s.free == s.total == 50
        assert s.kv + s.adapter == s.used == sum(len(p) for p, _ in held)
        assert s.kv == sum(len(p) for p, o in held if o == KV)
    with pytest.raises(ValueError):
        alloc.free([next(p for p in range(50) if p not in alloc.owner)])   # a free page freed again


def test_kv_blocks_grow_page_by_page_and_free_on_end():
    pool = make_pool(20)
    assert kv_pages(7, G) == 2 * 3
    assert len(pool.allocate_kv(0, 1)) == 2          # first token: one (K, V) pair
    assert pool.allocate_kv(0, 3) == []               # g = 3 tokens share that pair
    assert len(pool.allocate_kv(0, 4)) == 2           # the 4th token opens a new block
    pool.allocate_kv(1, 7)
    assert pool.stats().kv == 4 + 6 and pool.stats().adapter == 0
    table = pool.block_table([1, 0])                  # int32 [R, max_blocks, 2]
    assert table.dtype == torch.int32 and table.shape == (2, 3, 2)
    assert table[1, :2].tolist() == [list(b) for b in pool.blocks[0]]
    pages = table[0].flatten().tolist() + table[1, :2].flatten().tolist()
    assert len(set(pages)) == 10                      # every K and V page distinct
    pool.free_seq(0)
    assert pool.stats().kv == 6
    pool.free_seq(1)
    assert pool.stats().free == 20


def check_pool_holds(pool, ad, tensors, slot_tables, slot):
    """Pool pages named by the kernel tables hold the A rows and B columns of `tensors` (the adapter's
    PEFT weights), in every layer."""
    for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if t not in slot_tables:                  # no adapter of the step adapts it: no tables
            assert t not in ad.targets
            continue
        tab = slot_tables[t]
        r = int(tab.ranks[slot])
        assert r == (ad.rank if t in ad.targets else 0)
        for j in range(r):
            pa, pb = int(tab.page_ids[tab.a_start[slot] + j]), int(tab.page_ids[tab.b_start[slot] + j])
            for layer in range(L):
                key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
                A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
                assert torch.equal(pool.tensor[layer, pa], A[j])
                assert torch.equal(pool.tensor[layer, pb, :B.shape[0]], B[:, j])


def test_adapter_load_puts_the_right_numbers_in_the_right_pages(tmp_path):
    tensors = peft_tensors(3, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    a = HostAdapter.from_dir("a", str(tmp_path), L)
    b = make_adapter("b", 2, ("q_proj", "v_proj"), seed=2)
    assert (a.scale, a.n_pages, b.n_pages) == (2.0, 2 * 4 * 3, 2 * 2 * 2)
    pool = make_pool(60, [a, b])
    pool.allocate_kv(7, 5)                            # KV pages first, so adapter pages interleave
    pool.acquire("b")
    pool.allocate_kv(7, 9)
    pool.acquire("a")
    assert pool.stats().adapter == 24 + 8 and pool.stats().kv == 6
    tables = pool.kernel_tables(["a", "b"])
    assert tables["q_proj"].ranks.tolist() == [0, 3, 2] and tables["k_proj"].ranks.tolist() == [0, 3, 0]
    assert tables["q_proj"].scales.tolist() == [0.0, 2.0, 2.0]
    check_pool_holds(pool, a, read_adapter(str(tmp_path))[1], tables, 1)
    check_pool_holds(pool, b, peft_tensors(2, ("q_proj", "v_proj"), seed=2), tables, 2)


def test_unservable_target_is_refused_with_adapter_and_module_named():
    tensors = peft_tensors(2, ("q_proj",))
    for i in range(L):                        # a module that no engine here adapts
        tensors[lora.peft_key(i, "lm_head", "lora_A")] = torch.zeros(2, H)
        tensors[lora.peft_key(i, "lm_head", "lora_B")] = torch.zeros(H, 2)
    with pytest.raises(ValueError, match=r"'bad'.*'lm_head'"):
        HostAdapter.from_peft("bad", LoRAConfig(r=2, targets=("q_proj", "lm_head")), tensors, L)


def test_all_linear_adapter_takes_pages_by_row_width_and_they_hold_its_rows(tmp_path):
    """PEFT files with target_modules "all-linear" on a model of H = 12, F = 32 (2.67 H, as
    SmolLM2's 1536 = 2.67 x 576): a row of F numbers spans ceil(32 / 12) = 3 pages. Rank 3:
    q, k, v, o 3 + 3 pages each, gate and up 3 + 3 x 3, down 3 x 3 + 3: 4 x 6 + 3 x 12 = 60."""
    F, r = 32, 3
    widths = {"q_proj": (H, H), "k_proj": (H, KV_DIM), "v_proj": (H, KV_DIM), "o_proj": (H, H),
              "gate_proj": (H, F), "up_proj": (H, F), "down_proj": (F, H)}        # (I, O)
    assert adapters.target_shapes(PoolConfig(dim=H, tokens_per_page=G, ffn_dim=F)) == widths
    gen, tensors = torch.Generator().manual_seed(3), {}
    for i in range(L):
        for t, (I, O) in widths.items():
            tensors[lora.peft_key(i, t, "lora_A")] = torch.randn(r, I, generator=gen)
            tensors[lora.peft_key(i, t, "lora_B")] = torch.randn(O, r, generator=gen)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 6, "target_modules": "all-linear"}))
    ad = HostAdapter.from_dir("m", str(tmp_path), L, H)
    assert ad.n_pages == 4 * (3 + 3) + 3 * (3 + 3 * 3) == 60
    pool = UnifiedPool(PoolConfig(n_layers=L, n_pages=70, dim=H, tokens_per_page=G, ffn_dim=F))
    pool.register(ad)
    pool.allocate_kv(0, 5)                                # 4 KV pages: only 66 free, 60 taken
    pool.acquire("m")
    assert pool.stats().adapter == 60 and pool.stats().free == 6
    tables = pool.kernel_tables(["m"])
    assert [(tables[t].a_chunks, tables[t].b_chunks) for t in widths] == [(1, 1)] * 4 + [(1, 3)] * 2 + [(3, 1)]
    for t, (I, O) in widths.items():                      # chunk c of row j: numbers 12c .. 12c + 11
        tab, (ca, cb) = tables[t], (-(-I // H), -(-O // H))
        for rows, start, c_per_row, width in ((tensors[lora.peft_key(0, t, "lora_A")], tab.a_start[1], ca, I),
                                              (tensors[lora.peft_key(0, t, "lora_B")].T, tab.b_start[1], cb, O)):
            for j in range(r):
                pages = tab.page_ids[start + j * c_per_row:start + (j + 1) * c_per_row].long()
                held = pool.tensor[0, pages].reshape(-1)                                  # [C H]
                assert torch.equal(held[:width], rows[j]) and (held[width:] == 0).all(), (t, j)
    with pytest.raises(AdapterError, match=r"'m2': down_proj has .*rows=12, H=12, in=30, out=12; "
                                           r"the model has .*rows=12, H=12, in=32"):
        bad = dict(tensors)                               # down_proj of a model with F = 30 (also 3 pages)
        for i in range(L):
            bad[lora.peft_key(i, "down_proj", "lora_A")] = torch.randn(r, 30)
        pool.register(HostAdapter.from_peft("m2", LoRAConfig(r=r, targets=tuple(widths)), bad, L, H))
    with pytest.raises(AdapterError, match=r"'m3': q_proj has A of 3 rows and B of 3 columns; .* r = 4"):
        HostAdapter.from_peft("m3", LoRAConfig(r=4, targets=tuple(widths)), tensors, L, H)   # not padded


@pytest.mark.parametrize("dtype,per_page", [("float32", 4), ("bfloat16", 2)])
def test_int8_rows_fill_fewer_pages_and_hold_the_quantized_adapter(dtype, per_page):
    """adapter_dtype int8: an adapter's rows are quantized as they enter the pool, k = 4 int8 rows
    per float32 page (2 per bfloat16), so an adapter takes ceil(rows / k) pages and a pool of 16
    pages holds k times as many; the rows read back are the host copy's quantize_rows, KV written
    into the other pages leaves them alone, and an eviction frees exactly the adapter's pages."""
    ads = [make_adapter(f"a{i}", 2, seed=i) for i in range(12)]          # rank 2, q and v: 8 rows
    pools = {kind: UnifiedPool(PoolConfig(L, 16, H, G, dtype=dtype, adapter_dtype=kind))
             for kind in ("float", "int8")}
    for pool in pools.values():
        for ad in ads:
            pool.register(ad)
    loaded = {kind: pool.prefetch([ad.name for ad in ads]) for kind, pool in pools.items()}
    assert [len(loaded[k]) for k in ("float", "int8")] == [2, 2 * per_page]
    pool = pools["int8"]
    assert pool.pages_for(ads[0]) == 8 // per_page and pool.stats().adapter == 16
    assert isinstance(pool.rows, quant.Int8Rows) and pool.rows.q.data_ptr() == pool.tensor.data_ptr()
    gone, kept = loaded["int8"][:per_page // 2], loaded["int8"][per_page // 2:]   # 4 pages' worth
    for name in gone:
        pool.evict(name)
    kv = pool.allocate_kv(0, 2 * G)                                     # 4 KV pages in their place
    assert len(kv) == 4 and pool.stats().kv == 4 and list(pool.resident) == kept
    pool.tensor[:, kv] = torch.randn(L, len(kv), H).to(pool.tensor.dtype)
    for name in kept:
        host, tables = pool.host[name], pool.kernel_tables([name])
        for t in host.targets:
            ids, (q, s) = tables[t].page_ids.long(), quantize_rows(host.weights[t])   # [L, 2r, H]
            assert torch.equal(pool.rows.q[:, ids], q) and torch.equal(pool.rows.scale[:, ids], s)
            assert set((ids // per_page).tolist()) <= set(pool.resident[name].taken)   # its own pages
    taken = pool.resident[kept[0]].taken
    assert not set(taken) & set(kv) and len(taken) == 8 // per_page
    with pytest.raises(ValueError, match=r"adapter_dtype must be one of \['float', 'int8'\], got 'int4'"):
        PoolConfig(L, 16, H, G, adapter_dtype="int4")


def test_eviction_only_of_unused_adapters_in_lru_order():
    ads = [make_adapter(n, 2, seed=i) for i, n in enumerate("abc")]   # 8 pages each
    pool = make_pool(24, ads)
    for n in "abc":
        pool.acquire(n)
    pool.release("b")
    pool.release("a")                                 # a released last: b is least recently used
    pool.allocate_kv(0, 12)                           # 8 pages: only b is evicted
    assert list(pool.resident) == ["c", "a"]
    pool.allocate_kv(1, 12)                           # 8 more: a goes too
    assert list(pool.resident) == ["c"]
    with pytest.raises(PoolFullError):
        pool.allocate_kv(2, 3)                        # c is in use: never evicted
    assert list(pool.resident) == ["c"] and pool.stats().free == 0


def test_refcounts():
    pool = make_pool(8, [make_adapter("a", 2), make_adapter("b", 2, seed=1)])
    pool.acquire("a")
    pool.acquire("a")
    pool.release("a")
    with pytest.raises(PoolFullError):
        pool.acquire("b")                             # a still used once
    pool.release("a")
    pool.acquire("b")                                 # now a is evicted for b
    assert list(pool.resident) == ["b"]
    pool.release("b")
    with pytest.raises(ValueError):
        pool.release("b")


def test_adapter_for_another_model_shape_is_refused():
    wrong = HostAdapter("x", 1, 1.0, {"q_proj": torch.zeros(L + 1, 2, H)}, {"q_proj": H})   # [L+1, 2r, H]
    with pytest.raises(ValueError, match="'x'.*L=3"):
        make_pool(8).register(wrong)
    with pytest.raises(ValueError, match="out=12; the model has .* out=4"):    # B of v_proj is [kv_dim, r]
        make_pool(8).register(HostAdapter("y", 1, 1.0, {"v_proj": torch.zeros(L, 2, H)}, {"v_proj": H}))
    deeper = peft_tensors(1, ("q_proj",), n_layers=L + 1)
    with pytest.raises(ValueError, match="another model"):
        HostAdapter.from_peft("z", LoRAConfig(r=1, targets=("q_proj",)), deeper, L)


def test_prefetch_loads_without_evicting_used_or_wanted_adapters():
    ads = [make_adapter(n, 2, seed=i) for i, n in enumerate("abcd")]
    pool = make_pool(24, ads)
    pool.acquire("a")
    assert pool.prefetch(["b", "c", "d"]) == ["b", "c"]   # d finds no room: a is used, b, c wanted
    assert list(pool.resident) == ["a", "b", "c"] and pool.resident["b"].refs == 0
    tables = pool.kernel_tables(["b", "c"])
    check_pool_holds(pool, ads[1], peft_tensors(2, ("q_proj", "v_proj"), seed=1), tables, 1)
    check_pool_holds(pool, ads[2], peft_tensors(2, ("q_proj", "v_proj"), seed=2), tables, 2)
    assert pool.prefetch(["d"]) == ["d"]              # b (least recently used, unused) makes room
    assert list(pool.resident) == ["a", "c", "d"]


def test_a_name_registers_once_and_unregister_frees_only_unused_adapters():
    pool = make_pool(24, [make_adapter("a", 2)])
    with pytest.raises(ValueError, match="'a' is already registered"):
        pool.register(make_adapter("a", 3, seed=1))
    pool.acquire("a")
    with pytest.raises(ValueError, match="used by 1 running"):
        pool.unregister("a")
    assert "a" in pool.host and pool.stats().adapter == 8      # refused: nothing changed
    pool.release("a")
    pool.unregister("a")
    assert not pool.host and not pool.resident and pool.stats().free == 24
    pool.register(make_adapter("a", 3, seed=1))                # the name is free again
    pool.acquire("a")
    assert pool.kernel_tables(["a"])["q_proj"].ranks.tolist() == [0, 3]
    pool.register(make_adapter("b", 1))
    pool.unregister("b")                                       # registered, never loaded
    with pytest.raises(KeyError, match="'b' is not registered"):
        pool.unregister("b")
    with pytest.raises(AdapterError, match="'nan'.*not finite"):
        pool.register(HostAdapter("nan", 1, float("nan"), {"q_proj": torch.zeros(L, 2, H)},
                                  {"q_proj": H}))


@pytest.mark.parametrize("case", ["one layer's shape", "A width", "missing layer", "B too wide"])
def test_adapter_shape_problems_are_adapter_errors_naming_adapter_and_problem(case):
    tensors, dim = peft_tensors(2, ("q_proj", "v_proj")), None
    key = lora.peft_key(1, "v_proj", "lora_A")
    if case == "one layer's shape":
        tensors[key] = tensors[key][:, 1:]
        want = r"'x'.*layers\.1\.self_attn\.v_proj\.lora_A.*\[2, 11\], layer 0 \[2, 12\]"
    elif case == "A width":                   # an adapter of a model with H = 12, this one 16
        dim, want = 16, r"'x': q_proj has A of input width 12 .* H = 16"
    elif case == "missing layer":
        tensors[lora.peft_key(5, "v_proj", "lora_A")] = tensors.pop(key)
        want = r"'x': missing .*layers\.1\.self_attn\.v_proj\.lora_A"
    else:                                     # B [2H, r]: more outputs than a page holds
        for i in range(L):
            tensors[lora.peft_key(i, "q_proj", "lora_B")] = torch.zeros(2 * H, 2)
        want = r"'x': q_proj has A of input width 12 and B of output width 24"
    with pytest.raises(AdapterError, match=want):
        HostAdapter.from_peft("x", LoRAConfig(r=2, targets=("q_proj", "v_proj")), tensors, L, dim)


# ------------------------------------------------------------------------------ scheduler (scheduler.py)

def kv_of(n_tokens):
    """KV pages of n tokens in the test pool: 2 ceil(n / G)."""
    return kv_pages(n_tokens, G)


def sched(pages=100, policy="fcfs", **kw):
    return Scheduler(SchedulerConfig(policy=policy, **kw), pages, kv_of, {"x": 8, "y": 8, "z": 8})


def test_requests_join_within_one_step_and_share_it_with_decodes():
    s = sched()
    s.submit(Request(0, 5, 3, "x"))
    step = s.schedule(0.0)
    assert [r.id for r in step.prefill] == [0] and step.decode == []
    assert step.prefill[0].step_tokens() == 5 and step.prefill[0].cache_len() == 5
    s.advance(step, 0.1)
    s.submit(Request(1, 4, 3, "y"))
    s.submit(Request(2, 4, 3, None))
    step = s.schedule(0.1)
    assert [r.id for r in step.prefill] == [1, 2] and [r.id for r in step.decode] == [0]
    assert step.decode[0].step_tokens() == 1 and step.decode[0].cache_len() == 6


def test_request_failed_by_the_engine_leaves_the_batch():
    s = sched()
    a, b = Request(0, 2, 3, "x"), Request(1, 2, 3, "y")
    s.submit(a)
    s.submit(b)
    step = s.schedule(0.0)
    s.remove(b)                                       # e.g. its adapter could not be loaded
    assert s.advance(step, 0.1) == [] and s.running == [a] and b.n_generated == 0
    assert s.reserved() == (2 * 2, 8)                 # 2 ceil(5/3) KV pages + adapter x only


def test_prompt_that_can_never_fit_is_rejected_at_submission():
    s = sched(pages=20, max_prefill_tokens=30)
    too_big = Request(0, 25, 10, "x")                 # 2 ceil(35/3) + 8 = 32 > 20 pages
    with pytest.raises(RequestRejected, match="whole pool"):
        s.submit(too_big)
    assert s.idle()                                   # not queued (the engine marks it FAILED)
    with pytest.raises(RequestRejected, match="unknown adapter"):
        s.submit(Request(1, 2, 2, "nope"))
    with pytest.raises(RequestRejected, match="max_prefill_tokens"):
        Scheduler(SchedulerConfig(max_prefill_tokens=4), 100, kv_of, {}).submit(Request(2, 5, 1))


def test_full_pool_makes_requests_wait_and_none_is_lost():
    s = sched(pages=30)                                 # each request: 2 ceil(9/3) = 6 KV pages + adapter
    reqs = [Request(i, 5, 4, "xyz"[i % 3], arrival=0.0) for i in range(8)]
    for r in reqs:
        s.submit(r)
    step, now, running_sizes = s.schedule(0.0), 0.0, []
    assert [r.id for r in step.prefill] == [0, 1]     # 6+8 + 6+8 = 28 <= 30; a third needs 14 more
    while not s.idle():
        assert sum(s.reserved()) <= 30
        running_sizes.append(len(s.running))
        now += 1.0
        s.advance(step, now)
        step = s.schedule(now)
    assert all(r.state == State.FINISHED and r.n_generated == 4 for r in reqs)
    assert max(running_sizes) == 2


def test_prefill_budget_caps_prompt_tokens_per_step():
    s = sched(max_prefill_tokens=10)
    for i in range(4):
        s.submit(Request(i, 4, 2, None))
    assert [r.id for r in s.schedule(0.0).prefill] == [0, 1]   # 4 + 4 <= 10 < 12


def test_clustering_prefers_resident_adapters_but_starving_request_goes_first():
    s = sched(pages=20, policy="cluster", max_wait=5.0)      # room for one request (6 KV + 8 adapter)
    s.submit(Request(0, 3, 3, "x", arrival=0.0))
    s.submit(Request(1, 3, 3, "y", arrival=1.0))
    assert [r.id for r in s.schedule(2.0, resident=frozenset({"y"})).prefill] == [1]   # y resident
    s2 = sched(pages=20, policy="cluster", max_wait=5.0)
    s2.submit(Request(0, 3, 3, "x", arrival=0.0))
    s2.submit(Request(1, 3, 3, "y", arrival=1.0))
    assert [r.id for r in s2.schedule(6.0, resident=frozenset({"y"})).prefill] == [0]  # 0 waited > 5 s
    s3 = sched(pages=20, policy="fcfs")
    s3.submit(Request(0, 3, 3, "x", arrival=0.0))
    s3.submit(Request(1, 3, 3, "y", arrival=1.0))
    assert [r.id for r in s3.schedule(2.0, resident=frozenset({"y"})).prefill] == [0]


def test_early_abort_drops_request_past_its_first_token_deadline():
    s = sched(pages=20, ttft_slo=1.0)                 # one request at a time
    reqs = [Request(0, 3, 5, "x", arrival=0.0), Request(1, 3, 5, "y", arrival=0.0), Request(2, 3, 5, "z", arrival=0.9)]
    for r in reqs:
        s.submit(r)
    step = s.schedule(0.0)
    s.advance(step, 0.5)
    step = s.schedule(1.5)                            # request 1 waited 1.5 s > 1 s: dropped
    assert [r.id for r in step.aborted] == [1] and step.prefill == []
    assert [r.state for r in reqs] == [State.RUNNING, State.ABORTED, State.WAITING]
    assert s.waiting == [reqs[2]] and s.running == [reqs[0]]


def test_1000_random_requests_run_to_completion_with_every_page_free():
    rng, P = random.Random(1), 120
    ads = [make_adapter(f"a{i}", rng.choice([1, 2, 4]), seed=i) for i in range(6)]
    pool = make_pool(P, ads)
    cfg = SchedulerConfig(policy="cluster", max_prefill_tokens=64, max_wait=3.0, ttft_slo=8.0)
    s = Scheduler(cfg, P, kv_of, {a.name: a.n_pages for a in ads})
    now, pending, trace = 0.0, [], []
    for i in range(1000):
        now += rng.expovariate(8.0)
        adapter = rng.choice([None] + [a.name for a in ads])
        pending.append(Request(i, rng.randint(1, 40), rng.randint(1, 20), adapter, arrival=now))
    trace, now = list(pending), 0.0
    while pending or not s.idle():
        while pending and pending[0].arrival <= now:
            s.submit(pending.pop(0))
        step = s.schedule(now, frozenset(pool.resident))
        for r in step.prefill:
            if r.adapter is not None:
                pool.acquire(r.adapter)               # raises PoolFullError if admission over-commits
        for r in step.requests:
            pool.allocate_kv(r.id, r.cache_len())
        pool.prefetch([r.adapter for r in s.waiting[:4] if r.adapter is not None])
        st = pool.stats()
        assert st.used + st.free == P and st.kv + st.adapter == st.used and sum(s.reserved()) <= P
        now = now + 0.1 if step.requests or not pending else max(now, pending[0].arrival)
        for r in s.advance(step, now, frozenset(r.id for r in step.requests if rng.random() < 0.05)):
            pool.free_seq(r.id)
            if r.adapter is not None:
                pool.release(r.adapter)
    assert all(r.state in (State.FINISHED, State.ABORTED) for r in trace)
    assert sum(r.state == State.FINISHED for r in trace) > 500
    assert pool.stats().kv == 0 and all(res.refs == 0 for res in pool.resident.values())
    for name in list(pool.resident):
        pool.evict(name)
    assert pool.stats().free == P


# ---------------------------- the engine (records.py, memory.py, runner.py, engine.py, baselines.py), serve.py

ADAPTER_SPECS = {"a": (2, ("q_proj", "v_proj")), "b": (5, ("q_proj", "k_proj", "v_proj", "o_proj")),
                 "c": (1, ("o_proj",)), "d": (8, ("k_proj",))}


def write_adapters(base, specs, root):
    """PEFT adapters {name: (rank, targets)} of base on disk, with random A and B (B is zero at
    initialisation, which would make every adapter the base model)."""
    for i, (name, (r, targets)) in enumerate(specs.items()):
        m, cfg = copy.deepcopy(base), LoRAConfig(r=r, alpha=2 * r, targets=targets)
        lora.add_lora(m, cfg)
        randomize_lora(m, seed=10 + i)
        lora.save_adapter(m, root / name, cfg)
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny base model and four PEFT adapters of different ranks and targets on disk."""
    base = tiny_llama()
    return base, write_adapters(base, ADAPTER_SPECS, tmp_path_factory.mktemp("adapters"))


def merged_alone(base, root, prompt, name, n):
    """The reference: the request alone on the base model with its adapter merged into the weights."""
    m = copy.deepcopy(base)
    if name is not None:
        lora.load_adapter(m, root / name)
        lora.merge_lora(m)
    return m.generate([prompt], n)[0]


def mixed_requests(n=14, seed=1):
    """(prompt, adapter name, new tokens) of n requests over the base model and adapters a-d."""
    g = torch.Generator().manual_seed(seed)
    names = [None, "a", "b", "c", "d"]
    return [(torch.randint(0, 259, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
             names[i % 5], 3 + i % 6) for i in range(n)]


# dim 32, ffn_dim 88 = 2.75 x 32: a gate/up/down row spans 3 pages of 32 numbers, the last part-filled
MLP_SPECS = {"a": (3, tuple(lora.TARGET_NAMES.values())), "b": (2, ("q_proj", "v_proj")),
             "c": (5, ("down_proj",)), "d": (1, ("gate_proj", "up_proj", "o_proj"))}


def mlp_llama():
    return tiny_llama(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=88)


@pytest.fixture(scope="module")
def served_mlp(tmp_path_factory):
    """mlp_llama() and the MLP_SPECS adapters on disk, "a" saved as target_modules "all-linear"."""
    base = mlp_llama()
    root = write_adapters(base, MLP_SPECS, tmp_path_factory.mktemp("mlp_adapters"))
    config = json.loads((root / "a" / "adapter_config.json").read_text())
    (root / "a" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "all-linear"}))
    return base, root


def check_mixed_batch_equals_merged(base, root, specs, mode, fresh_base, host_adapters):
    """Requests over the base model and every adapter of specs, arriving while others run: each
    gets the tokens of the request alone with its adapter merged; nothing is left held."""
    engine = B.ENGINES[mode](base, None, pool_pages=400, host_adapters=host_adapters)
    for name in specs:
        engine.add_adapter(name, str(root / name))
    reqs, ids = mixed_requests(), []
    for i, (prompt, name, n) in enumerate(reqs):   # arrivals spread over the run
        ids.append(engine.submit(prompt, name, n))
        if i % 3 == 2:
            engine.step(), engine.step()
    while engine.step() or engine.pending():
        pass
    for rid, (prompt, name, n) in zip(ids, reqs):
        assert engine.records[rid].tokens[len(prompt):] == merged_alone(base, root, prompt, name, n), (mode, name)
    stats = engine.pool.stats()
    assert stats.kv == 0 and stats.free + stats.adapter == stats.total
    x = torch.randint(0, 259, (1, 5))
    assert torch.equal(base(x), fresh_base()(x))                   # the merged mode restored the weights


@pytest.mark.parametrize("host_adapters", [None, 1])   # 1: adapters are read from disk again to load
@pytest.mark.parametrize("mode", B.ENGINES)
def test_mixed_batch_equals_each_request_alone_with_its_adapter_merged(served, mode, host_adapters):
    check_mixed_batch_equals_merged(*served, ADAPTER_SPECS, mode, tiny_llama, host_adapters)


@pytest.mark.parametrize("host_adapters", [None, 1])
@pytest.mark.parametrize("mode", B.ENGINES)
def test_all_linear_adapter_in_a_mixed_batch_equals_each_request_alone_merged(served_mlp, mode,
                                                                               host_adapters):
    """An all-linear adapter (rank 3), q,v (rank 2), down only (rank 5), gate, up, o (rank 1) and
    the base model in one batch, ffn_dim 88 not a multiple of dim 32: every mode serves each
    request as the model with its adapter merged into the weights."""
    check_mixed_batch_equals_merged(*served_mlp, MLP_SPECS, mode, mlp_llama, host_adapters)


def record_logits(engine) -> list:
    """The logits [R, V] of every step the engine runs, appended as they are computed."""
    seen, run = [], engine.runner.run
    engine.runner.run = lambda batch, slots: seen.append(run(batch, slots)) or seen[-1]
    return seen


@pytest.mark.parametrize("mode", ["slora", "bmm"])
def test_int8_adapter_rows_serve_as_float_rows_of_the_dequantized_adapters(served_mlp, mode):
    """adapter_dtype int8 on the all-linear adapters (rows over several pages included) and the base
    model in one batch: every request gets the tokens of the float engine serving the dequantized
    adapters, in a quarter of the pages; the modes that do not read adapter rows from the pool
    refuse the option by name."""
    base, root = served_mlp
    int8, ref, unquantized = (B.ENGINES[mode](base, None, pool_pages=400, adapter_dtype=kind)
                              for kind in ("int8", "float", "float"))
    for name in MLP_SPECS:
        int8.add_adapter(name, str(root / name))
        unquantized.add_adapter(name, str(root / name))
        ad = HostAdapter.from_dir(name, str(root / name), base.config.n_layers, base.config.dim)
        ref.registry.register(int8_bench.dequantized(ad))
        assert int8.registry.pages[name] == -(-ad.n_pages // 4) and ref.registry.pages[name] == ad.n_pages
    reqs = mixed_requests()
    prompts, names = [p for p, _, _ in reqs], [n for _, n, _ in reqs]
    logits = [record_logits(e) for e in (int8, ref, unquantized)]
    assert int8.generate(prompts, names, 6) == ref.generate(prompts, names, 6)
    unquantized.generate(prompts, names, 6)
    assert len(logits[0]) == len(logits[1]) == len(logits[2]) > 5
    for got, want in zip(logits[0], logits[1]):              # step by step: the same batches
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert max((g - f).abs().max() for g, f in zip(logits[0], logits[2])) > 1e-4   # int8 is not float
    for name in {n for n in names if n}:
        assert len(int8.pool.resident[name].taken) == -(-len(ref.pool.resident[name].taken) // 4)
    for other in ("no-unified", "merged"):
        with pytest.raises(ValueError, match=f"adapter_dtype 'int8' is not implemented for mode {other}"):
            B.ENGINES[other](base, None, pool_pages=400, adapter_dtype="int8")
    with pytest.raises(ValueError, match="'int8' is not implemented under tensor parallelism"):
        tp.ShardedMemory(base, E.EngineConfig(adapter_dtype="int8"), None)   # before any sharding


@needs_real_model
@pytest.mark.skipif(not os.environ.get("E2E_DATA"), reason="E2E_DATA (folder with the E2E CSV files) is not set")
def test_int8_bench_on_the_real_model_counts_pages_and_scores_both_ways(real, tmp_path, capsys):
    """int8_bench.main on SmolLM2 with a random q,v adapter and 3 test MRs: the logit gap is small
    and not zero, a pool holds 4 times as many int8 copies, both engines score the MRs."""
    write_adapters(real[0], {"a": (2, ("q_proj", "v_proj"))}, tmp_path)
    gap, held, scores = int8_bench.main(int8_bench.Int8BenchConfig(
        adapter=str(tmp_path / "a"), base=REAL_MODEL, limit=3, max_new_tokens=4, pool_pages=80))
    assert 0 < gap["max_logit_diff"] < 1 and gap["positions"] > 30
    assert held == {"float": 10, "int8": 40}                   # 8 pages float32, 2 int8
    assert set(scores) == {"float", "int8"} and "BLEU int8 - float" in capsys.readouterr().out


def test_unknown_adapter_and_oversized_prompt_fail_alone(served):
    base, root = served
    engine = E.Engine(base, None, pool_pages=60)
    engine.add_adapter("a", str(root / "a"))
    out = engine.generate([[1, 2, 3], [4, 5], list(range(200))], ["a", "nope", None], 4)
    assert out[0] == merged_alone(base, root, [1, 2, 3], "a", 4)
    assert isinstance(out[1], E.Failed) and "unknown adapter 'nope'" in out[1].reason
    assert isinstance(out[2], E.Failed) and "more than the whole pool" in out[2].reason


def test_bad_adapter_refused_at_registration_others_still_served(served, tmp_path):
    base, root = served
    engine = E.Engine(base, None, pool_pages=200)
    engine.add_adapter("a", str(root / "a"))
    _write_adapter(tmp_path / "broken", {"use_dora": True})
    with pytest.raises(AdapterError, match="use_dora"):
        engine.add_adapter("broken", str(tmp_path / "broken"))
    other = tiny_llama(ffn_dim=64)                 # an MLP adapter of a model of another ffn_dim
    lora.add_lora(other, LoRAConfig(r=2, targets=("gate_proj",)))
    lora.save_adapter(other, tmp_path / "mlp", LoRAConfig(r=2, targets=("gate_proj",)))
    with pytest.raises(AdapterError, match=r"gate_proj .*out=64; the model has .*out=96"):
        engine.add_adapter("mlp", str(tmp_path / "mlp"))
    assert engine.generate([[7, 8, 9]], ["a"], 3)[0] == merged_alone(base, root, [7, 8, 9], "a", 3)


def test_full_pool_makes_requests_wait_and_loses_nothing(served):
    base, root = served
    # 60 pages: adapter b takes 40, each request reserves 2 ceil((prompt + new) / 3) KV pages
    engine = E.Engine(base, None, pool_pages=60)
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, str(root / name))
    reqs = mixed_requests(10, seed=3)
    out = engine.generate([p for p, _, _ in reqs], [a for _, a, _ in reqs], 6)
    assert out == [merged_alone(base, root, p, a, 6) for p, a, _ in reqs]
    assert max(st.tokens for st in engine.stats) < sum(len(p) for p, _, _ in reqs)   # never all at once
    assert engine.pool.stats().kv == 0


def test_trace_statistics():
    t = serve.TraceConfig(adapters=50, rate=20.0, duration=1000.0, cv=2.0, alpha=0.5, input_len="3,9")
    trace = serve.make_trace(t, vocab_size=100)
    gaps = np.diff([0.0] + [r["arrival"] for r in trace])
    assert len(trace) == 20000
    assert abs(gaps.mean() - 1 / 20) < 0.003 and abs(gaps.std() / gaps.mean() - 2.0) < 0.1
    first_tenth = np.mean([r["adapter"] < 5 for r in trace])      # power law: P(index < n/10) = 0.1^alpha
    assert abs(first_tenth - 0.1 ** 0.5) < 0.02
    assert {len(r["prompt"]) for r in trace} == set(range(3, 10))
    uniform = serve.make_trace(serve.TraceConfig(adapters=50, rate=20.0, duration=1000.0, alpha=1.0), 100)
    assert abs(np.mean([r["adapter"] < 5 for r in uniform]) - 0.1) < 0.01


def test_vs_peft_says_what_is_missing_and_compares_real_peft_adapter_files(monkeypatch, tmp_path):
    """--vs-peft without transformers or peft stops, naming them (they are not dependencies);
    the adapters it compares are PEFT files written by lora.py, of the workload's ranks, with a
    non-zero B, that the engine's loader reads back."""
    monkeypatch.setattr(vs_peft.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="missing here: transformers, peft"):
        vs_peft.compare(None, 1, 1, E.EngineConfig())
    monkeypatch.undo()
    cfg, w = ModelConfig.tiny(), vs_peft.PeftWorkload(adapters=4)
    paths = vs_peft.write_peft_adapters(cfg, w, str(tmp_path))
    assert list(paths) == [f"adapter-{i}" for i in range(4)]
    for i, (name, path) in enumerate(paths.items()):
        lcfg, tensors = read_adapter(path)
        assert lcfg.r == w.ranks[i] and sorted(lcfg.targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert all(t.abs().sum() > 0 for t in tensors.values())
        assert HostAdapter.from_dir(name, path, cfg.n_layers, cfg.dim).rank == lcfg.r


def test_peft_side_finds_the_pypi_kernels_package_not_ours(monkeypatch, tmp_path):
    """transformers 5 does `from kernels import CUDAProperties` when the PyPI package `kernels` is
    installed; from this directory our kernels.py shadows it. Stand-ins for the three packages
    show the clash in a plain process, then PeftSide's child (PYTHONPATH naming this directory
    too) imports the stand-in `kernels` and answers with the versions it imported."""
    here, site = os.path.dirname(os.path.realpath(vs_peft.__file__)), tmp_path / "site"
    for package, source in {"kernels": "CUDAProperties = object\n",
                            "transformers": "from kernels import CUDAProperties\n__version__ = '5.x'\n",
                            "peft": "__version__ = '0.x'\n"}.items():
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text(source)
    clash = subprocess.run([sys.executable, "-c", "import transformers"], cwd=here, text=True,
                           capture_output=True, env=dict(os.environ, PYTHONPATH=str(site)))
    assert clash.returncode != 0 and "cannot import name 'CUDAProperties'" in clash.stderr
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, str(site)]))
    side = vs_peft.PeftSide("no model: versions only", {}, threads=1)
    side.close()
    assert side.ready == {"transformers": "5.x", "peft": "0.x",
                          "kernels": str(site / "kernels" / "__init__.py")}
    assert side.proc.returncode == 0


def test_base_matmul_seconds_counts_the_time_inside_every_linear_and_removes_its_hooks():
    """--vs-peft's ceiling: the seconds spent inside the model's nn.Linear calls (50 ms slept in
    lm_head counts) and not outside them (50 ms slept after the forward does not); no hook stays."""
    model = Llama(ModelConfig.tiny()).eval()
    head = model.lm_head
    head.forward = lambda x: (time.sleep(0.05), torch.nn.functional.linear(x, head.weight))[1]

    def run():
        start = time.perf_counter()
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        time.sleep(0.05)
        return None, time.perf_counter() - start
    base, seconds = vs_peft.base_matmul_seconds(model, run)
    assert 0.05 <= base <= seconds - 0.05
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_figure5_needs_matplotlib_and_summarises_runs_by_median_and_range(monkeypatch):
    """--figure5 without matplotlib stops before any replay, saying how to install it; the
    numbers it plots are each mode's median and range over the runs, per adapter count."""
    import figures
    monkeypatch.setattr(figures.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        serve.figure5(serve.BenchConfig(figure5="x.svg", modes="no-such-mode"), serve.TraceConfig(),
                      E.EngineConfig())
    points = {100: {"slora": [{"req/s": 3.0}, {"req/s": 1.0}, {"req/s": 2.5}]},
              5: {"slora": [{"req/s": 4.0}], "bmm": [{"req/s": 2.0}, {"req/s": 1.0}]}}
    s = figures.summary(points, "req/s")
    assert s["slora"] == {"x": [5, 100], "median": [4.0, 2.5], "low": [4.0, 1.0], "high": [4.0, 3.0]}
    assert s["bmm"] == {"x": [5], "median": [1.5], "low": [1.0], "high": [2.0]}

def test_1000_request_trace_ends_with_every_page_free(served):
    base, root = served
    engine = E.Engine(base, None, pool_pages=150, ttft_slo=0.5, policy="cluster")
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, str(root / name))
    t = serve.TraceConfig(rate=4000.0, duration=0.25, input_len="1,6", output_len="1,3", seed=2)
    trace = serve.make_trace(t, vocab_size=259)
    names = [[None, "a", "b", "c", "d"][r["adapter"] % 5] for r in trace]
    stats = serve.replay(engine, trace, names, slo=0.5)
    states = [r.request.state for r in engine.records.values()]
    assert len(states) == 1000 and set(states) <= {State.FINISHED, State.ABORTED}
    assert stats["aborted"] == states.count(State.ABORTED)
    assert engine.pool.stats().kv == 0 and engine.pool.stats().free + engine.pool.stats().adapter == 150
    assert all(res.refs == 0 for res in engine.pool.resident.values())



HOST_SPECS = {f"h{i}": (1 + i % 3, ("q_proj", "k_proj", "v_proj", "o_proj")[:2 + 2 * (i % 2)]) for i in range(6)}
# Requests per round, and whether the pool drops every unused adapter before the round. With a host
# limit of 2 the copies (least recently read first) and the reads go, counted by hand:
#   registration  h0..h5 read once each: 6 reads, copies [h4, h5]
#   round 1       h0 read, h1 read, (h0 resident), h2 read: 9 reads, copies [h1, h2]
#   round 2       pool emptied; h2 copy kept, h5 read, h1 read, h3 read: 12 reads, copies [h1, h3]
#   round 3       h1 and h3 still resident in the pool; h4 read, h0 read: 14 reads, copies [h4, h0]
HOST_ROUNDS = [(["h0", "h1", None, "h0", "h2"], False), (["h2", "h5", "h1", "h3"], True),
               (["h1", "h3", "h4", None, "h0"], False)]


def test_host_limit_keeps_n_adapters_in_memory_reads_the_rest_and_changes_no_output(served, tmp_path):
    base, _ = served
    root = write_adapters(base, HOST_SPECS, tmp_path)
    limited = E.Engine(base, None, pool_pages=400, prefetch=0, host_adapters=2)
    unlimited = E.Engine(base, None, pool_pages=400, prefetch=0)
    for name in HOST_SPECS:
        limited.add_adapter(name, str(root / name))
        unlimited.add_adapter(name, str(root / name))
    store = limited.registry.host_store
    assert store.reads == 6 and [c.name for c in store.copies.values()] == ["h4", "h5"]
    g = torch.Generator().manual_seed(4)
    for names, empty_pool_first in HOST_ROUNDS:
        if empty_pool_first:
            for name in [n for n, res in limited.pool.resident.items() if res.refs == 0]:
                limited.pool.evict(name)
        prompts = [torch.randint(0, 259, (3 + i,), generator=g).tolist() for i in range(len(names))]
        ids = [limited.submit(p, n, 4) for p, n in zip(prompts, names)]
        while limited.step() or limited.pending():
            assert len(store.copies) <= 2                          # host memory: never above 2 adapters
        assert [limited.records.result(i) for i in ids] == unlimited.generate(prompts, names, 4)
    assert store.reads == 14 and [c.name for c in store.copies.values()] == ["h4", "h0"]
    metrics = limited.metrics()
    assert metrics["adapter_disk_reads"][1] == 14 and metrics["adapters_in_host_memory"][1] == 2
    assert unlimited.metrics()["adapters_in_host_memory"][1] == 6
    assert metrics["adapter_loads"][1] == 9                      # 9 pool loads, 8 of them read the disk


def test_host_limit_refuses_bad_adapters_at_registration_and_fails_only_requests_of_changed_files(
        served, tmp_path):
    base, _ = served
    specs = {"x": (2, ("q_proj", "v_proj")), "y": (3, ("q_proj",)), "z": (1, ("o_proj",))}
    root = write_adapters(base, specs, tmp_path)
    engine = E.Engine(base, None, pool_pages=400, host_adapters=1)
    for name in specs:
        engine.add_adapter(name, str(root / name))
    bad = read_adapter(root / "x")[1]
    bad[lora.peft_key(1, "v_proj", "lora_A")][0, 0] = float("nan")
    _write_adapter(tmp_path / "nan", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}, bad)
    with pytest.raises(AdapterError, match="NaN"):           # read whole at registration: values checked
        engine.add_adapter("nan", str(tmp_path / "nan"))
    assert not engine.has_adapter("nan") and len(engine.registry.host_store.copies) <= 1
    (root / "x" / "adapter_model.safetensors").unlink()
    conf = json.loads((root / "y" / "adapter_config.json").read_text())
    (root / "y" / "adapter_config.json").write_text(json.dumps({**conf, "lora_alpha": 99}))
    out = engine.generate([[1, 2, 3]] * 4, ["x", "y", "z", None], 3)
    assert isinstance(out[0], E.Failed) and "removed after registration" in out[0].reason
    assert isinstance(out[1], E.Failed) and "changed after registration" in out[1].reason
    assert out[2:] == [merged_alone(base, root, [1, 2, 3], name, 3) for name in ("z", None)]
    assert engine.pool.stats().adapter == 2 * 1 * 1 and engine.pool.stats().kv == 0   # only z's pages
    assert engine.remove_adapter("x") == 0 and all(c.name != "x" for c in engine.registry.host_store.copies.values())

# ------------------------------------------------------------------------------ the engine survives bad input, faults

def assert_nothing_held(engine):
    """Nothing waiting or running; no KV page, no adapter reference left."""
    stats = engine.pool.stats()
    assert not engine.pending() and not engine.live and not any(r.holds_pages for r in engine.records.values())
    assert stats.kv == 0 and stats.free + stats.adapter == stats.total
    assert all(res.refs == 0 for res in engine.pool.resident.values())


BAD_REQUESTS = [  # (prompt, adapter, max_new_tokens, temperature), what the reason says
    (([1, 259], None, 3, 0.0), r"token ids must be ints in \[0, 259\)"),
    (([1, -2], None, 3, 0.0), "token ids"), (([1, 2.5], None, 3, 0.0), "token ids"),
    (([1, True], None, 3, 0.0), "token ids"), (("hello", None, 3, 0.0), "list of token ids"),
    (([], None, 3, 0.0), "non-empty"), (([1, 2], None, 2.5, 0.0), "max_new_tokens"),
    (([1, 2], None, 0, 0.0), "max_new_tokens"), (([1] * 500, None, 20, 0.0),
     r"maximum context length is 512 tokens\. However, you requested 520 tokens \(500 in the prompt, 20 in"),
    (([1, 2], None, 3, -1.0), "temperature"), (([1, 2], None, 3, float("nan")), "temperature"),
    (([1, 2], "nope", 3, 0.0), "unknown adapter 'nope'"), (([1] * 30, "a", 30, 0.0), "whole pool")]


def test_bad_requests_fail_alone_at_submission_holding_nothing(served):
    base, root = served
    engine = E.Engine(base, None, pool_pages=30)
    engine.add_adapter("a", str(root / "a"))
    good = engine.submit([1, 2, 3], "a", 4)
    bad = [engine.submit(*args[:3], temperature=args[3]) for args, _ in BAD_REQUESTS]
    for rid, (_, reason) in zip(bad, BAD_REQUESTS):
        out = engine.records.result(rid)
        assert isinstance(out, E.Failed) and out.state == State.FAILED and re.search(reason, out.reason)
    assert engine.live == {good} and engine.pool.stats().kv == 0
    while engine.step():
        pass
    assert engine.records.result(good) == merged_alone(base, root, [1, 2, 3], "a", 4)
    assert_nothing_held(engine)


def test_a_failed_load_or_step_fails_only_its_requests_and_serving_goes_on(served, monkeypatch):
    base, root = served
    engine = E.Engine(base, None, pool_pages=200)
    for name in "ab":
        engine.add_adapter(name, str(root / name))
    load = engine.pool.load

    def load_but_b(name, *args):
        if name == "b":
            raise OSError("disk gone")
        return load(name, *args)
    monkeypatch.setattr(engine.pool, "load", load_but_b)
    out = engine.generate([[1, 2], [3, 4], [5]], ["a", "b", None], 3)
    assert out[0] == merged_alone(base, root, [1, 2], "a", 3) and out[2] == merged_alone(base, root, [5], None, 3)
    assert isinstance(out[1], E.Failed) and "'b' could not be loaded: OSError: disk gone" in out[1].reason
    monkeypatch.setattr(engine.pool, "load", load)
    forward, calls = base.forward_paged, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return forward(*args)
    monkeypatch.setattr(base, "forward_paged", fails_once)
    out = engine.generate([[1, 2], [3, 4]], ["a", "b"], 3)       # the second step raises
    assert all(isinstance(o, E.Failed) and "RuntimeError: device lost" in o.reason for o in out)
    assert engine.generate([[3, 4]], ["b"], 3) == [merged_alone(base, root, [3, 4], "b", 3)]
    assert_nothing_held(engine)


def test_non_finite_logits_fail_their_request_alone(served):
    base, root = served
    cfg = base.config
    engine = E.Engine(base, None, pool_pages=300)
    engine.add_adapter("a", str(root / "a"))
    huge = HostAdapter.random("huge", cfg.n_layers, cfg.dim, {"v_proj": cfg.kv_dim}, rank=2)
    huge.weights["v_proj"].mul_(1e25)           # finite weights whose products overflow float32
    engine.registry.register(huge)
    with pytest.raises(AdapterError, match="not finite"):   # a non-finite scale is refused
        engine.registry.register(dataclasses.replace(huge, name="nan", scale=float("nan")))
    assert list(engine.registry.current) == ["a", "huge"] and "nan" not in engine.pool.host
    out = engine.generate([[1, 2, 3], [4, 5], [6]], ["a", "huge", None], 4)
    assert isinstance(out[1], E.Failed) and "not finite" in out[1].reason
    assert out[0] == merged_alone(base, root, [1, 2, 3], "a", 4) and out[2] == merged_alone(base, root, [6], None, 4)
    assert_nothing_held(engine)


def test_finite_logits_whose_sum_overflows_serve_as_usual(served, monkeypatch):
    """The engine checks a row's sum first (one cheap pass); finite logits whose sum overflows
    (two of 3e38) are then checked number by number and still serve."""
    base, _ = served
    engine, forward = E.Engine(base, None, pool_pages=300), base.forward_paged

    def huge(*args):
        logits = forward(*args).clone()
        logits[:, 5] = logits[:, 6] = 3e38                   # finite, their sum is inf
        return logits
    monkeypatch.setattr(base, "forward_paged", huge)
    assert engine.generate([[1, 2, 3], [4]], [None, None], 3) == [[5, 5, 5], [5, 5, 5]]
    assert_nothing_held(engine)


def test_a_name_registered_again_serves_new_requests_while_running_ones_finish(served):
    base, root = served
    engine = E.Engine(base, None, pool_pages=300)
    engine.add_adapter("x", str(root / "a"))
    first = engine.submit([1, 2, 3], "x", 6)
    engine.step()                                      # running on the first version (rank 2)
    engine.add_adapter("x", str(root / "b"))           # rank 5, other targets
    second = engine.submit([1, 2, 3], "x", 6)
    while engine.step():
        pass
    assert engine.records.result(first) == merged_alone(base, root, [1, 2, 3], "a", 6)
    assert engine.records.result(second) == merged_alone(base, root, [1, 2, 3], "b", 6)
    assert list(engine.pool.host) == [engine.registry.current["x"]]   # the first version is gone
    third = engine.submit([4, 5], "x", 5)
    engine.step()
    engine.remove_adapter("x")                         # deferred: the running request finishes
    fourth = engine.submit([4, 5], "x", 5)
    while engine.step():
        pass
    assert engine.records.result(third) == merged_alone(base, root, [4, 5], "b", 5)
    assert "unknown adapter 'x'" in engine.records.result(fourth).reason
    assert not engine.pool.host and engine.pool.stats().free == engine.pool.stats().total
    with pytest.raises(KeyError, match="'x' is not registered"):
        engine.remove_adapter("x")


def test_generate_checks_its_lists_and_says_why_a_request_has_no_output(served):
    base, _ = served
    engine = E.Engine(base, None, pool_pages=300, ttft_slo=1e-9)   # every first token is late
    with pytest.raises(ValueError, match="2 prompts but 1 adapter names"):
        engine.generate([[1], [2]], [None], 3)
    out = engine.generate([[1, 2]], [None], 3)[0]
    assert isinstance(out, E.Failed) and out.state == State.ABORTED and "SLO" in out.reason


def test_an_interrupted_generate_cancels_its_requests_and_cancel_frees_pages(served, monkeypatch):
    base, root = served
    engine = E.Engine(base, None, pool_pages=300)
    engine.add_adapter("a", str(root / "a"))
    forward, calls = base.forward_paged, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(*args)
    monkeypatch.setattr(base, "forward_paged", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[1, 2], [3, 4, 5]], ["a", None], 8)
    assert [engine.records[i].request.state for i in (0, 1)] == [State.ABORTED] * 2
    assert_nothing_held(engine)
    rid = engine.submit([1, 2, 3], "a", 8)
    engine.step()
    assert engine.pool.stats().kv > 0 and engine.cancel(rid) and not engine.cancel(rid)
    assert engine.records.result(rid) == E.Failed("cancelled", State.ABORTED)
    assert_nothing_held(engine)
    assert engine.generate([[7, 8]], ["a"], 3) == [merged_alone(base, root, [7, 8], "a", 3)]


@pytest.mark.parametrize("options, problem", [
    (dict(pool_pages=-5), "pool_pages = -5"), (dict(pool_pages=2.5), "pool_pages"),
    (dict(adapter_reserve=0), "adapter_reserve = 0"), (dict(pool_pages=9, adapter_reserve=9), "adapter_reserve"),
    (dict(policy="lifo"), "policy = 'lifo'"), (dict(ttft_slo=-1.0), "ttft_slo"),
    (dict(ttft_slo=float("nan")), "ttft_slo"), (dict(prefetch=-1), "prefetch"),
    (dict(max_prefill_tokens=0), "max_prefill_tokens"), (dict(host_adapters=0), "host_adapters = 0"),
    (dict(mode="bmm"), "unexpected keyword argument 'mode'")])
def test_engine_options_are_checked_at_construction(served, options, problem):
    with pytest.raises(ValueError, match=problem):
        E.Engine(served[0], None, **options)


def test_an_unknown_engine_mode_is_named():
    with pytest.raises(ValueError, match="unknown engine mode 'fast'; choose from .*no-unified"):
        B.make_engine("fast", tiny_llama())


def run_engine(engine):
    while engine.step() or engine.pending():
        pass


def test_seeded_sampling_is_each_requests_own_and_stop_ids_end_requests(served):
    base, root = served
    merged = copy.deepcopy(base)
    lora.load_adapter(merged, root / "b")
    lora.merge_lora(merged)
    params, prompt = M.SamplingParams(temperature=1.3, top_p=0.9, top_k=40, seed=3), [5, 6, 7]
    gen, want = torch.Generator().manual_seed(3), []      # the draws, token by token, from dense logits
    for _ in range(8):
        with torch.no_grad():
            logits = merged(torch.tensor([prompt + want]))[0, -1]
        want.append(M.sample_one(logits, params, gen))
    engine = E.Engine(base, None, pool_pages=400)
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, str(root / name))
    greedy = merged_alone(base, root, [9, 9], "a", 6)
    others = [engine.submit([1, 2, 3, 4], "c", 8, sampling=M.SamplingParams(0.8, seed=None)),
              engine.submit([9, 9], "a", 6, temperature=0.0, stop_ids=[greedy[2]])]
    rid = engine.submit(prompt, "b", 8, sampling=params)
    run_engine(engine)
    assert engine.records.result(rid) == want                    # whatever else shared the batch
    assert engine.records.result(others[1]) == greedy[:greedy.index(greedy[2]) + 1]
    assert engine.records.progress(others[1]) == (engine.records.result(others[1]), "finished", None)
    metrics = {k: v for k, (_, v) in engine.metrics().items()}
    assert metrics["requests_finished"] == 3 and metrics["requests_waiting"] == metrics["requests_running"] == 0
    assert metrics["tokens_generated"] == 8 + 8 + len(engine.records.result(others[1]))
    assert metrics["pages_kv"] == 0 and metrics["adapter_loads"] == metrics["adapters_resident"] == 3
    assert metrics["pages_free"] + metrics["pages_adapter"] == 400 and metrics["adapters_registered"] == 4
    bad = [engine.submit([1], None, 2, sampling=M.SamplingParams(top_p=0)),
           engine.submit([1], None, 2, stop_ids=["x"]), engine.submit([1], None, 2, sampling=0.5)]
    assert [engine.records.failure(i)[:4] for i in bad] == ["top_", "stop", "samp"]
    assert engine.metrics()["requests_failed"][1] == 3 and engine.records.failure(rid) is None
    engine.forget(rid)
    assert rid not in engine.records
    live = engine.submit([1, 2], None, 4)
    with pytest.raises(ValueError, match="has not ended"):
        engine.forget(live)
    engine.cancel(live)
    assert engine.metrics()["requests_aborted"][1] == 1 and engine.submit([1], None, 1) == live + 1


def soak_adapters(cfg, n, rng, prefix="s"):
    """n random adapters of ranks 1-4 on random servable targets."""
    widths = adapters.target_widths(cfg)
    return [HostAdapter.random(f"{prefix}{i}", cfg.n_layers, cfg.dim,
                               {t: w for t, w in widths.items() if rng.random() < 0.6} or {"q_proj": cfg.dim},
                               rank=rng.choice([1, 2, 4]), seed=rng.randrange(10**6)) for i in range(n)]


class AloneReference:
    """Each request run alone on a fault-free engine that has every adapter version."""
    def __init__(self, model):
        self.engine, self.known, self.cache = E.Engine(model, None, pool_pages=400), {}, {}

    def __call__(self, prompt, adapter, n):
        key = (tuple(prompt), None if adapter is None else id(adapter), n)
        if adapter is not None and id(adapter) not in self.known:
            self.known[id(adapter)] = name = f"v{len(self.known)}"
            self.engine.registry.register(dataclasses.replace(adapter, name=name))
        if key not in self.cache:
            name = None if adapter is None else self.known[id(adapter)]
            self.cache[key] = self.engine.generate([prompt], [name], n)[0]
        return self.cache[key]


def test_soak_faults_in_15_percent_of_forwards_lose_nothing_and_leak_nothing():
    rng, model = random.Random(0), tiny_llama(seed=5)
    adapters = soak_adapters(model.config, 50, rng)
    alone, engine = AloneReference(copy.deepcopy(model)), E.Engine(model, None, pool_pages=250, policy="cluster")
    for ad in adapters:
        engine.registry.register(ad)
    forward = model.forward_paged

    def faulty(*args):
        if rng.random() < 0.15:
            raise RuntimeError("injected fault")
        return forward(*args)
    model.forward_paged = faulty
    requests = [([rng.randrange(259) for _ in range(rng.randint(1, 8))], rng.choice([None] + adapters),
                 rng.randint(1, 4)) for _ in range(300)]
    todo, rounds = list(range(300)), 0
    while todo:                                         # the caller retries what failed
        rounds, submitted = rounds + 1, {}
        for i, k in enumerate(todo):
            prompt, ad, n = requests[k]
            submitted[engine.submit(prompt, None if ad is None else ad.name, n)] = k
            if i % 10 == 9:
                engine.step()
        while engine.step() or engine.pending():
            pass
        todo = []
        for rid, k in submitted.items():
            out = engine.records.result(rid)
            if isinstance(out, E.Failed):
                assert "RuntimeError: injected fault" in out.reason
                todo.append(k)
            else:
                assert out == alone(*requests[k]), k
    assert 1 < rounds < 40
    assert_nothing_held(engine)


def test_soak_a_random_mix_of_good_and_bad_requests_adapters_and_cancellations(tmp_path):
    rng, model = random.Random(1), tiny_llama(seed=6)
    alone, engine = AloneReference(model), E.Engine(model, None, pool_pages=200, policy="cluster")
    torch.manual_seed(0)
    good = load_file(_write_adapter(tmp_path / "good") / "adapter_model.safetensors")
    broken = []
    for i, case in enumerate(list(BAD_ADAPTERS) + list(BAD_CONFIGS)):
        tensors = {k: v.clone() for k, v in good.items()}
        BAD_ADAPTERS.get(case, lambda t: None)(tensors)
        broken.append(_write_adapter(tmp_path / f"bad{i}", BAD_CONFIGS.get(case), tensors))
    version, valid, invalid = {}, {}, []             # name -> HostAdapter; rid -> (prompt, version, n)
    for step in range(500):
        action, names = rng.random(), list(version)
        if action < 0.45:
            ad = rng.choice([None] + names)
            prompt, n = [rng.randrange(259) for _ in range(rng.randint(1, 10))], rng.randint(1, 5)
            valid[engine.submit(prompt, ad, n)] = (prompt, version.get(ad), n)
        elif action < 0.6:
            bad = rng.choice([([300], None, 2), ([1, -1], None, 2), ([1] * 510, None, 5), ([], None, 2),
                              ([1, 2], "missing", 2), ([1], None, 0), ("text", None, 2)])
            invalid.append(engine.submit(*bad))
        elif action < 0.68:
            before = dict(engine.registry.current)
            with pytest.raises(AdapterError):
                engine.add_adapter(rng.choice(names + ["new"]), str(rng.choice(broken)))
            assert engine.registry.current == before
        elif action < 0.8:
            ad, = soak_adapters(model.config, 1, rng, prefix=rng.choice("pqrs"))
            engine.registry.register(ad)                       # a new name, or a new version of one
            version[ad.name] = ad
        elif action < 0.88 and names:
            name = rng.choice(names)
            engine.remove_adapter(name)
            del version[name]
        elif engine.live:
            engine.cancel(rng.choice(sorted(engine.live)))
        engine.step()
    while engine.step() or engine.pending():
        pass
    assert all(engine.records[i].request.state == State.FAILED and engine.records[i].reason for i in invalid)
    outcomes = {engine.records[rid].request.state for rid in valid}
    assert outcomes == {State.FINISHED, State.ABORTED}
    for rid, request in valid.items():
        if engine.records[rid].request.state == State.FINISHED:
            assert engine.records.result(rid) == alone(*request), rid
        else:
            assert engine.records[rid].reason == "cancelled"
    assert_nothing_held(engine)
    assert set(engine.pool.host) == set(engine.registry.current.values())   # old versions all gone


# ------------------------------------------------------------------------------ tensor parallelism (tp.py)

# 6 query heads over 3 KV heads: 2 devices split them unevenly, KV heads {0, 1} and {2}.
CFG = ModelConfig.tiny(n_kv_heads=3)
# Odd ranks, so that the rows of A do not split evenly; every servable target somewhere.
SPECS = {"a": (3, ("q_proj", "k_proj", "v_proj", "o_proj")), "b": (2, ("q_proj", "v_proj")),
         "c": (5, ("k_proj", "o_proj")), "d": (1, ("q_proj", "o_proj"))}


def base_model():
    torch.manual_seed(0)
    return Llama(CFG).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The SPECS adapters of base_model() on disk, and a broken one."""
    root = write_adapters(base_model(), SPECS, tmp_path_factory.mktemp("tp_adapters"))
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text(json.dumps({"r": 2, "target_modules": ["q_proj"]}))
    return root


def serve_requests(engine, root, adapter_dir=lambda name: name):
    """Register the adapters, submit the requests in waves between steps, run to the end.
    Returns the new tokens, the logits of every step [rows, V] and, per step, (tokens, adapters used)."""
    for name in SPECS:
        engine.add_adapter(name, str(root / adapter_dir(name)))
    logits, steps = [], []
    forward, make_lora = engine.model.forward_paged, engine.runner.lora

    def recording_forward(batch, pool, lora_fn=None):
        logits.append(forward(batch, pool, lora_fn).clone())
        return logits[-1]

    def recording_lora(slots):          # ModelRunner.lora(slots): the step's adapters
        steps.append((int(slots.lengths.sum()), list(slots.names)))
        return make_lora(slots)

    engine.model.forward_paged, engine.runner.lora = recording_forward, recording_lora
    reqs, ids = mixed_requests(12), []
    for i, (prompt, name, n) in enumerate(reqs):
        ids.append(engine.submit(prompt, name, n))
        if i % 3 == 2:
            engine.step(), engine.step()
    while engine.step() or engine.pending():
        pass
    return [engine.records[k].tokens[len(p):] for k, (p, _, _) in zip(ids, reqs)], torch.cat(logits), steps


DENSE_INPUT = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]


def _rank(comm, root, out, bad_rank=None):
    model = base_model()
    shard = tp.shard_model(model, comm)
    with torch.no_grad():   # the dense forward (training's, generate's) runs sharded too
        dense = model(torch.tensor(DENSE_INPUT))
    engine = tp.ShardedEngine(model, comm, shard, None, pool_pages=300)
    tokens, logits, steps = serve_requests(engine, root, lambda n: "broken" if comm.rank == bad_rank else n)
    save_file({"logits": logits, "dense": dense}, str(out / f"logits{comm.rank}.safetensors"))
    (out / f"run{comm.rank}.json").write_text(json.dumps(
        {"tokens": tokens, "steps": steps, "step_bytes": engine.step_bytes, "bytes": comm.bytes}))


def test_two_devices_give_the_tokens_and_logits_of_one(root, tmp_path):
    tokens, logits, steps = serve_requests(E.Engine(base_model(), None, pool_pages=300), root)
    with torch.no_grad():
        dense = base_model()(torch.tensor(DENSE_INPUT))
    tp.launch(2, _rank, root, tmp_path, timeout_s=60, device_type="cpu")
    for k in range(2):   # every device computes the same full logits
        run = json.loads((tmp_path / f"run{k}.json").read_text())
        got = load_file(str(tmp_path / f"logits{k}.safetensors"))
        assert run["tokens"] == tokens and run["steps"] == [list(s) for s in steps]
        assert got["logits"].shape == logits.shape and (got["logits"] - logits).abs().max() < 1e-4
        assert (got["dense"] - dense).abs().max() < 1e-4
    assert max(len(names) for _, names in steps) >= 3                     # batches mixed several adapters
    # Bytes per step, by hand: two all-reduces of [N, H] per layer; per LoRA target that some adapter of
    # the step adapts, an all-gather of [W, N, ceil(r_max / W)] (q, k, v) or an all-reduce of [N, r_max] (o).
    base = [2 * CFG.n_layers * n * CFG.dim * 4 for n, _ in steps]
    lora_bytes = []
    for n, names in steps:
        per_layer = 0
        for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ranks = [SPECS[a][0] for a in names if target in SPECS[a][1]]
            if ranks:
                per_layer += n * (max(ranks) if target == "o_proj" else 2 * -(-max(ranks) // 2)) * 4
        lora_bytes.append(CFG.n_layers * per_layer)
    assert [list(b) for b in run["step_bytes"]] == [list(b) for b in zip(base, lora_bytes)]
    assert 0 < sum(lora_bytes) < sum(base)


def test_an_error_on_one_device_ends_the_group(root, tmp_path):
    start = time.perf_counter()
    with pytest.raises(tp.TensorParallelError, match=r"rank 1: AdapterError: .*broken.*adapter_model"):
        tp.launch(2, _rank, root, tmp_path, 1, timeout_s=60, device_type="cpu")
    assert time.perf_counter() - start < 40          # the other device did not wait for a timeout
    assert not (tmp_path / "run0.json").exists()



def _torchrun(args, *script):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, *map(str, script)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})


def test_torchrun_one_node_and_two_nodes_give_the_tokens_and_logits_of_one(root, tmp_path):
    """Under torchrun, tp.launch joins the group from the environment (env://) instead of
    spawning: two processes on one node, then two nodes of one process each (static rendezvous,
    both on this machine), each give one device's tokens and logits; --tp 3 with two processes
    is refused by name."""
    tokens, logits, _ = serve_requests(E.Engine(base_model(), None, pool_pages=300), root)
    here = os.path.dirname(os.path.realpath(tp.__file__))
    script = tmp_path / "ranks.py"    # each rank notes its torchrun RANK, then runs _rank
    script.write_text(f"""import os, pathlib, sys
sys.path.insert(0, {here!r})
import test_all, tp

def noted_rank(comm, root, out):
    (out / f"rank{{comm.rank}}-RANK{{os.environ['RANK']}}").touch()
    test_all._rank(comm, root, out)

if __name__ == "__main__":
    world, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    tp.launch(world, noted_rank, pathlib.Path({str(root)!r}), out, timeout_s=60, device_type="cpu")
""")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    static = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
              "--master-port", str(port)]
    for name, launches in (("one-node", [["--standalone", "--nproc-per-node", "2"]]),
                           ("two-nodes", [static + ["--node-rank", str(k)] for k in (0, 1)])):
        out = tmp_path / name
        out.mkdir()
        procs = [_torchrun(args, script, 2, out) for args in launches]
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stdout.read()
        assert sorted(p.name for p in out.glob("rank*")) == ["rank0-RANK0", "rank1-RANK1"]
        for k in range(2):
            run = json.loads((out / f"run{k}.json").read_text())
            got = load_file(str(out / f"logits{k}.safetensors"))["logits"]
            assert run["tokens"] == tokens and (got - logits).abs().max() < 1e-4, (name, k)
    wrong = _torchrun(["--standalone", "--nproc-per-node", "2"], script, 3, tmp_path)
    assert wrong.wait(timeout=120) != 0
    assert "--tp 3, but torchrun started 2 processes" in wrong.stdout.read()



def test_the_http_server_over_tensor_parallelism_needs_torchrun(monkeypatch):
    """--port with --tp N outside torchrun says how to launch it; under torchrun a --tp unlike
    the number of processes is refused by name; both before any model is loaded."""
    net = server.NetworkConfig()
    with pytest.raises(SystemExit, match="runs under torchrun: torchrun --standalone --nproc-per-node 2"):
        serve.serve_http(serve.ServerConfig(port=0), serve.BenchConfig(tp=2), E.EngineConfig(), net)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--tp 1, but torchrun started 2 processes"):
        serve.serve_http(serve.ServerConfig(port=0), serve.BenchConfig(), E.EngineConfig(), net)


def _mlp_rank(comm, root, out):
    model = mlp_llama()
    engine = tp.ShardedEngine(model, comm, tp.shard_model(model, comm), None, pool_pages=400)
    tokens, logits, steps = serve_requests(engine, root)
    save_file({"logits": logits}, str(out / f"logits{comm.rank}.safetensors"))
    (out / f"run{comm.rank}.json").write_text(json.dumps({"tokens": tokens, "step_bytes": engine.step_bytes}))


def test_two_devices_serve_all_linear_adapters_as_one(served_mlp, tmp_path):
    """gate, up column-parallel (z all-gathered), down row-parallel (z all-reduced, its delta in
    the base all-reduce), each device's ffn share 44 > 32 = H spanning 2 of a row's 3 pages: both
    devices give the tokens and logits of one device, which are those of the merged model."""
    base, root = served_mlp
    tokens, logits, steps = serve_requests(E.Engine(mlp_llama(), None, pool_pages=400), root)
    for (prompt, name, n), got in zip(mixed_requests(12), tokens):
        assert got == merged_alone(base, root, prompt, name, n), name
    tp.launch(2, _mlp_rank, root, tmp_path, timeout_s=60, device_type="cpu")
    cfg, lora_bytes = base.config, []
    for n, names in steps:   # per target some adapter of the step adapts, by hand (as for q, k, v, o)
        ranks = {t: max([MLP_SPECS[a][0] for a in names if t in MLP_SPECS[a][1]], default=0)
                 for t in adapters.SERVABLE}
        lora_bytes.append(cfg.n_layers * 4 * n * sum(
            r if t in tp.ROW_PARALLEL else 2 * -(-r // 2) for t, r in ranks.items()))
    assert max(len(names) for _, names in steps) >= 3             # batches mixed several adapters
    for k in range(2):
        run = json.loads((tmp_path / f"run{k}.json").read_text())
        got = load_file(str(tmp_path / f"logits{k}.safetensors"))["logits"]
        assert run["tokens"] == tokens and (got - logits).abs().max() < 1e-4
        assert [b[1] for b in run["step_bytes"]] == lora_bytes


class _NoComm:
    """Stands in for tp.Comm where nothing is communicated."""
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def all_reduce(self, t, kind):
        return t


def test_shards_tile_the_weights_and_the_adapters():
    full, world = base_model(), 2
    models = [base_model() for _ in range(world)]
    shards = [tp.shard_model(m, _NoComm(k, world)) for k, m in enumerate(models)]
    for name, dim in (("self_attn.q_proj", 0), ("self_attn.k_proj", 0), ("self_attn.o_proj", 1),
                      ("mlp.gate_proj", 0), ("mlp.down_proj", 1)):
        parts = [m.get_submodule(f"model.layers.1.{name}").weight for m in models]
        assert torch.equal(torch.cat(parts, dim), full.get_submodule(f"model.layers.1.{name}").weight)
    assert [m.model.layers[0].self_attn.cfg.n_kv_heads for m in models] == [2, 1]
    ad = HostAdapter.random("x", CFG.n_layers, CFG.dim, {"q_proj": CFG.dim, "v_proj": CFG.kv_dim,
                                                         "o_proj": CFG.dim}, rank=3, seed=4)
    packed = [tp._ShardPages(ad, s) for s in shards]     # [L, 2r, H]: A rows, then B^T rows
    q_w, kv_w = [s.q.stop - s.q.start for s in shards], [s.kv.stop - s.kv.start for s in shards]
    assert torch.equal(packed[0]["q_proj"][:, :2], ad.a("q_proj")[:, 0::2])               # rows 0, 2 of A
    assert torch.equal(packed[1]["q_proj"][:, :1], ad.a("q_proj")[:, 1::2])               # row 1
    assert packed[1]["q_proj"][:, 1:3].abs().sum() == 0
    assert torch.equal(torch.cat([p["v_proj"][:, 3:, :w] for p, w in zip(packed, kv_w)], 2), ad.bt("v_proj"))
    assert torch.equal(torch.cat([p["o_proj"][:, :3, :w] for p, w in zip(packed, q_w)], 2), ad.a("o_proj"))
    assert torch.equal(torch.cat([p["o_proj"][:, 3:, :CFG.dim // 2] for p in packed], 2), ad.bt("o_proj"))
    with pytest.raises(ValueError, match="n_kv_heads"):
        tp.Shard.of(CFG, 0, 4)
    with pytest.raises(ValueError, match="plain base model"):
        m = base_model()
        lora.add_lora(m, LoRAConfig(r=2))
        tp.shard_model(m, _NoComm(0, 2))


# ------------------------------------------------------------------------------ HTTP server (engine_loop.py, server.py)

import socket  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import engine_loop  # noqa: E402
import server  # noqa: E402

HTTP_RANKS = {"r1": 1, "r2": 2, "r3": 3, "r4": 4, "r5": 5, "r6": 6, "r7": 7, "r8": 8}
EOS = ByteTokenizer().eos_id


@pytest.fixture(scope="module")
def http_adapters(tmp_path_factory):
    """A tiny model and eight PEFT adapters of ranks 1-8 on q, k, v, o, on disk."""
    base = tiny_llama(seed=5)
    specs = {name: (r, ("q_proj", "k_proj", "v_proj", "o_proj")) for name, r in HTTP_RANKS.items()}
    return base, write_adapters(base, specs, tmp_path_factory.mktemp("http_adapters"))


def new_engine(base, root, names=tuple(HTTP_RANKS), **options):
    engine = E.Engine(base, eos_id=EOS, **{"pool_pages": 400, **options})
    for name in names:
        engine.add_adapter(name, str(root / name))
    return engine


def alone(engine, prompt, name, n):
    """(text, finish_reason, completion tokens) of the greedy request alone on an engine."""
    ids = engine.generate([prompt], [name], n)[0]
    text = ByteTokenizer().decode([t for t in ids if t != EOS])
    return text, "stop" if ids[-1] == EOS else "length", len(ids)


@contextlib.contextmanager
def serving(http_adapters, **net):
    """A running server on an ephemeral port of 127.0.0.1 with NetworkConfig(**net): (url, server)."""
    base, root = http_adapters
    httpd = server.start_server(new_engine(base, root), ByteTokenizer(), "tiny", port=0,
                                net=server.NetworkConfig(**net))
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        server.stop_server(httpd, grace_s=2.0)


@pytest.fixture
def http(http_adapters):
    """A server that may load adapters from the test adapters' directory: (base url, server)."""
    with serving(http_adapters, adapter_dir=[str(http_adapters[1])]) as running:
        yield running


def call(url, path, body=None, headers=None):
    """(status, parsed JSON or text) of one HTTP request through urllib."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status, kind = r.read().decode(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, kind = e.read().decode(), e.code, "application/json"
    return status, json.loads(raw) if kind.startswith("application/json") else raw


def stream(url, path, body):
    """The data: events of a streamed response, parsed, up to [DONE]."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        for line in r:
            line = line.decode().strip()
            if line == "data: [DONE]":
                return events
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    raise AssertionError("stream ended without [DONE]")


def scrape(url):
    """/metrics as {name: value}, every line of the Prometheus text format checked."""
    status, text = call(url, "/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.split(" ")
            values[name.removeprefix("slora_")] = float(value)
    return values


def test_health_models_and_metrics(http):
    url, _ = http
    assert call(url, "/health") == (200, {"status": "ok"})
    status, models = call(url, "/v1/models")
    ids = {m["id"]: m for m in models["data"]}
    assert status == 200 and set(ids) == {"tiny", *HTTP_RANKS}
    assert all(ids[n]["parent"] == "tiny" for n in HTTP_RANKS) and "parent" not in ids["tiny"]
    assert call(url, "/v1/completions", {"model": "r2", "prompt": "hi", "max_tokens": 3})[0] == 200
    m = scrape(url)
    assert {"requests_waiting", "requests_running", "requests_finished", "requests_failed", "tokens_generated",
            "pages_free", "pages_kv", "pages_adapter", "adapters_registered", "adapters_resident",
            "adapter_loads", "adapter_evictions", "adapters_in_host_memory", "adapter_disk_reads"} <= set(m)
    assert m["requests_finished"] == 1 and m["adapters_registered"] == 8 and m["adapter_loads"] == 1
    assert m["adapters_in_host_memory"] == 8 and m["adapter_disk_reads"] == 0   # no host limit
    assert m["pages_kv"] == 0 and m["pages_free"] + m["pages_adapter"] == 400


def test_32_concurrent_clients_each_equal_to_the_request_alone(http, http_adapters):
    url, _ = http
    base, root = http_adapters
    g = torch.Generator().manual_seed(7)
    names = [None, *HTTP_RANKS]
    jobs = [(torch.randint(0, 256, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist(),
             names[i % len(names)], 2 + i % 5) for i in range(32)]

    def one(job):
        prompt, name, n = job
        return call(url, "/v1/completions", {"model": name or "tiny", "prompt": prompt, "max_tokens": n,
                                             "temperature": 0})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, jobs))
    engines = {name: new_engine(base, root, [name] if name else []) for name in names}
    for (prompt, name, n), (status, body) in zip(jobs, results):
        text, finish, used = alone(engines[name], prompt, name, n)
        assert status == 200, body
        assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == finish
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": used,
                                 "total_tokens": len(prompt) + used}


def test_streamed_pieces_concatenate_to_the_non_streamed_text(http):
    url, _ = http
    body = {"model": "r3", "prompt": "héllo wörld", "max_tokens": 12, "temperature": 0}
    whole = call(url, "/v1/completions", body)[1]["choices"][0]["text"]
    events = stream(url, "/v1/completions", body)
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == whole and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in whole
    chat = {"model": "r5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    whole = call(url, "/v1/chat/completions", chat)[1]
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    events = stream(url, "/v1/chat/completions", chat)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == whole["choices"][0]["message"]["content"]


def test_chat_prompt_is_chatml_and_ends_at_im_end(http_adapters):
    base, root = http_adapters
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = server.render_chat(messages, tok)
    assert rendered == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    engine = new_engine(base, root, ["r4"])
    ids = tok.encode(rendered, allow_special=True)
    greedy = engine.generate([ids], ["r4"], 3)[0]
    end = tok.special["<|im_end|>"]
    loop = engine_loop.EngineLoop(engine, tok, "tiny")           # no thread: stepped here
    prompt, stop_ids = loop.encode(rendered, chat=True)
    assert prompt == ids and stop_ids == {EOS, end}
    rid = engine.submit(ids, "r4", 3, stop_ids=[greedy[1]])   # as if token 2 were <|im_end|>
    run_engine(engine)
    assert engine.records.result(rid) == greedy[:greedy.index(greedy[1]) + 1]


def test_stop_strings_and_seeded_sampling(http):
    url, _ = http
    body = {"model": "r2", "prompt": "abc", "max_tokens": 10, "temperature": 0}
    text = call(url, "/v1/completions", body)[1]["choices"][0]["text"]
    stop = text[3:5]
    got = call(url, "/v1/completions", {**body, "stop": [stop]})[1]["choices"][0]
    assert got["text"] == text[:text.find(stop)] and got["finish_reason"] == "stop"
    seeded = {"model": "r4", "prompt": "xyz", "max_tokens": 8, "temperature": 1.5, "top_k": 50, "seed": 11}
    first = call(url, "/v1/completions", seeded)[1]["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:   # the same seed in a different batch: the same text
        others = list(pool.map(lambda b: call(url, "/v1/completions", b)[1]["choices"][0]["text"],
                               [seeded, {**seeded, "seed": 12}, {**seeded, "model": "tiny"}, seeded]))
    assert others[0] == others[3] == first


HTTP_BAD_REQUESTS = [   # (path, body, status, words in the message)
    ("/v1/completions", b"{not json", 400, "malformed JSON"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 2}, 400, "n=2"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "nope"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 999]}, 400, "999"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 600}, 400, "maximum context length is"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": 1e308}, 400, "between 0 and 2"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": 2.5}, 400, "between 0 and 2"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0]"),
    ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "x"}, 400, "lora_name"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "nope"),
    ("/v1/nowhere", {}, 404, "no route"),
]


@pytest.mark.parametrize("path,body,status,words", HTTP_BAD_REQUESTS)
def test_bad_requests_get_openai_errors(http, path, body, status, words):
    url, _ = http
    got_status, got = call(url, path, body)
    assert got_status == status and words in got["error"]["message"], got
    assert set(got["error"]) == {"message", "type", "code"}
    assert call(url, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})[0] == 200


def test_load_use_replace_unload_adapter(http, http_adapters, tmp_path):
    url, httpd = http
    base, root = http_adapters
    (root / "empty").mkdir(exist_ok=True)
    status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": str(root / "empty")})
    assert status == 400 and "adapter" in err["error"]["message"]          # an empty directory
    assert call(url, "/v1/completions", {"model": "new", "prompt": "a"})[0] == 404
    assert call(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": str(root / "r6")})[0] == 200
    body = {"model": "new", "prompt": "hello", "max_tokens": 5, "temperature": 0}
    want6 = alone(new_engine(base, root, ["r6"]), list(b"hello"), "r6", 5)[0]
    assert call(url, "/v1/completions", body)[1]["choices"][0]["text"] == want6
    assert call(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": str(root / "r7")})[0] == 200
    want7 = alone(new_engine(base, root, ["r7"]), list(b"hello"), "r7", 5)[0]
    assert want7 != want6 and call(url, "/v1/completions", body)[1]["choices"][0]["text"] == want7
    status, done = call(url, "/v1/unload_lora_adapter", {"lora_name": "new"})
    assert status == 200 and "freed" in done["note"]
    assert call(url, "/v1/completions", body)[0] == 404
    assert "new" not in {m["id"] for m in call(url, "/v1/models")[1]["data"]}


def test_unload_while_streaming_is_deferred_and_the_stream_finishes(http):
    url, httpd = http
    body = json.dumps({"model": "r8", "prompt": "abc", "max_tokens": 300, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body)
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.readline().startswith(b"data: ")            # streaming has begun
        status, done = call(url, "/v1/unload_lora_adapter", {"lora_name": "r8"})
        assert status == 200 and done["note"].startswith("deferred: 1 running")
        rest = r.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
    m = scrape(url)
    assert m["pages_kv"] == 0 and m["adapters_registered"] == 7


def wait_until(check, seconds=30):
    deadline = time.time() + seconds
    while not check() and time.time() < deadline:
        time.sleep(0.05)
    return check()


def test_client_disconnect_mid_stream_cancels_and_returns_the_pages(http, capsys):
    url, httpd = http
    body = json.dumps({"model": "r8", "prompt": "abc", "max_tokens": 450, "stream": True}).encode()
    s = socket.create_connection(httpd.server_address)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)                  # streaming has begun
    s.close()
    assert wait_until(lambda: scrape(url)["requests_aborted"] == 1)
    out = capsys.readouterr()
    assert "went away" in out.out and "Traceback" not in out.out + out.err   # one line, no traceback
    m = scrape(url)
    assert m["pages_kv"] == 0 and m["requests_running"] == m["requests_finished"] == 0 and not httpd.loop.live
    assert m["tokens_generated"] < 450


def test_shutdown_with_requests_in_flight_ends_each_with_a_reason(http_adapters):
    base, root = http_adapters
    httpd = server.start_server(new_engine(base, root), ByteTokenizer(), "tiny", port=0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, url, "/v1/completions", {"model": "r1", "prompt": "a", "max_tokens": 400})
                   for _ in range(6)]
        time.sleep(0.5)
        server.stop_server(httpd, grace_s=0.2)
        results = [f.result() for f in futures]
    for status, body in results:   # each one answered: finished, or cancelled with the reason
        assert status == 200 or (status == 503 and "shutting down" in body["error"]["message"]), body
    assert any(status == 503 for status, _ in results)
    assert httpd.loop.engine.pool.stats().kv == 0 and not httpd.loop.thread.is_alive()


def test_long_completion_benchmark_streams_every_token_and_reports_both_ratios(capsys):
    rows = http_bench.long_completion(serve.BenchConfig(layers=1), E.EngineConfig(pool_pages=400), 150)
    assert set(rows) == {"in process", "http"} and all(f > 0 and l > 0 for f, l in rows.values())
    out = capsys.readouterr().out
    assert out.count("150 tokens: first 100") == 2 and "last / first" in out


def test_http_benchmark_streams_every_trace_request_with_the_in_process_tokens(capsys):
    model = tiny_llama(seed=3)
    t = serve.TraceConfig(adapters=6, rate=100.0, duration=0.2, input_len="2,6", output_len="2,5", ranks="1,2,4")
    b, e = serve.BenchConfig(), E.EngineConfig(pool_pages=300)
    local, local_ids = http_bench.in_process(model, b, t, e)
    served, served_ids = http_bench.over_http(model, b, t, e)
    trace = serve.make_trace(t, model.config.vocab_size)
    assert local["failed"] == served["failed"] == 0 and len(served_ids) == len(trace) == 20
    assert served_ids == local_ids and [len(ids) for ids in served_ids] == [r["max_new_tokens"] for r in trace]
    assert 0 < served["ttft_p50"] <= served["ttft_p90"] and served["tpot_p50"] > 0
    http_bench.report_http([{"in process": local, "http": served}])
    assert f"median {served['req/s'] / local['req/s']:.2f}x" in capsys.readouterr().out

def test_repeated_benchmark_reports_median_and_range_of_each_ratio(capsys):
    runs = [{"slora": {"req/s": s}, "base": {"req/s": b}} for s, b in ((2.0, 4.0), (3.0, 3.0), (1.0, 4.0))]
    serve.report_repeats(runs)
    assert "slora / base throughput over 3 runs: median 0.50x, range 0.25-1.00x" in capsys.readouterr().out


def _chromium() -> str:
    """The system's Chromium, installed from Debian's packages when missing (as root); the test
    is skipped, saying why, where neither works."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("no Chromium here, and `apt-get install chromium` could not install it")
    return path


def test_pool_page_in_a_real_browser_shows_the_pages_of_a_running_request(http_adapters, monkeypatch):
    """GET /pool, loaded by headless Chromium while a request runs: a square per page, those of
    the request's KV cache and of its adapter r3 among them, r3 listed as in the pool with one
    request; /metrics says the same as labelled series."""
    base, root = http_adapters
    assert alone(new_engine(base, root, ["r3"]), list(b"hello"), "r3", 400)[1] == "length"
    browser = _chromium()
    with serving(http_adapters, open_metrics=True) as (url, httpd):
        engine, step, seen = httpd.loop.engine, httpd.loop.engine.step, threading.Event()
        slow = lambda: (None if seen.is_set() else time.sleep(0.05)) or step()   # noqa: E731
        monkeypatch.setattr(engine, "step", slow)          # a slow model until the page is read
        body = {"model": "r3", "prompt": "hello", "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(call, url, "/v1/completions", body)
            deadline = time.monotonic() + 30
            while engine.pool.stats().kv == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                  "--dump-dom", url + "/pool"], capture_output=True, text=True,
                                 timeout=120).stdout
            metrics = call(url, "/metrics")[1]
            seen.set()
            assert running.result()[0] == 200
    pages = re.findall(r'<rect class="page" data-owner="([^"]+)"', dom)
    assert len(pages) == engine.pool.cfg.n_pages
    assert any(p.startswith("request ") for p in pages) and "adapter r3" in pages
    assert re.search(r"<td>r3</td><td>pool</td><td>1</td><td>\d+</td>", dom)
    assert re.search(r"<td>r1</td><td>host</td><td>0</td><td>0</td>", dom)
    assert 'slora_adapter_resident{name="r3",tier="pool"} 1' in metrics
    assert 'slora_adapter_requests{name="r3"} 1' in metrics


def test_pool_picture_is_the_pools_owners(tmp_path):
    """pool_view.write_picture: one square per page coloured by owner, and the owners as JSON."""
    cfg = PoolConfig(n_layers=1, n_pages=12, dim=8, tokens_per_page=2)
    pool = UnifiedPool(cfg)
    pool.register(HostAdapter.random("a", 1, 8, {"q_proj": 8}, 2, seed=0))
    pool.acquire("a")
    pool.allocate_kv(7, 3)
    pool_view.write_picture(pool, str(tmp_path / "p.svg"), "test")
    owners = json.loads((tmp_path / "p.json").read_text())["owners"]
    svg = (tmp_path / "p.svg").read_text()
    assert owners.count("adapter a") == 4 and owners.count("request 7") == 2 * len(pool.blocks[7])
    assert owners.count(None) == 12 - 4 - 2 * len(pool.blocks[7])
    assert re.findall(r'data-owner="([^"]+)"', svg) == [o or "free" for o in owners]


# ------------------------------------------------------------------ the server on a network (engine_loop.py, server.py)

def raw(address, data: bytes = b"", wait: float = 10.0) -> bytes:
    """Send bytes on a new socket; everything the server answers until it closes (or `wait` s)."""
    s = socket.create_connection(address, timeout=wait)
    got = b""
    try:
        s.sendall(data)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk
    except (socket.timeout, ConnectionResetError):
        return got
    finally:
        s.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def test_api_key_guards_every_route_but_health(http_adapters, monkeypatch):
    good = {"model": "r2", "prompt": "hi", "max_tokens": 4, "temperature": 0}
    key = {"Authorization": "Bearer s3cret"}
    with serving(http_adapters, api_key="s3cret") as (url, _):
        assert call(url, "/health")[0] == 200
        for path, body in (("/v1/models", None), ("/v1/completions", good), ("/metrics", None),
                           ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "r1"}), ("/v1/x", None)):
            status, err = call(url, path, body)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, err)
        status, err = call(url, "/v1/models", headers={"Authorization": "Bearer s3cre"})
        assert status == 401 and "Incorrect API key" in err["error"]["message"]
        status, got = call(url, "/v1/completions", good, headers=key)
        want = alone(new_engine(http_adapters[0], http_adapters[1], ["r2"]), list(b"hi"), "r2", 4)[0]
        assert status == 200 and got["choices"][0]["text"] == want
        assert call(url, "/metrics", headers=key)[0] == 200
    with serving(http_adapters, api_key="s3cret", open_metrics=True) as (url, _):
        assert call(url, "/metrics")[0] == 200 and call(url, "/v1/models")[0] == 401
    monkeypatch.setenv("SLORA_API_KEY", "from-env")
    with serving(http_adapters) as (url, _):
        assert call(url, "/v1/models")[0] == 401
        assert call(url, "/v1/models", headers={"Authorization": "Bearer from-env"})[0] == 200


def test_loading_over_http_is_off_by_default_and_confined_to_the_adapter_dirs(http_adapters, tmp_path):
    base, root = http_adapters
    with serving(http_adapters) as (url, _):
        status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "r1")})
        assert status == 403 and "--adapter-dir" in err["error"]["message"]
    outside, allowed = tmp_path / "outside", tmp_path / "allowed"
    shutil.copytree(root / "r3", outside)
    shutil.copytree(root / "r3", allowed / "mine")
    (allowed / "link").symlink_to(outside)
    with serving(http_adapters, adapter_dir=[str(allowed)]) as (url, _):
        def load(path):
            return call(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        refused = [load(p) for p in (str(outside), str(tmp_path / "missing"), "../outside", "link",
                                     "mine/../../outside", "/etc")]
        assert all(status == 403 for status, _ in refused), refused
        assert len({json.dumps(err) for _, err in refused}) == 1   # the same whether or not it exists
        assert "'x'" in refused[0][1]["error"]["message"] and "outside" in refused[0][1]["error"]["message"]
        assert load("mine")[0] == 200                              # relative: inside the first one
        body = {"model": "x", "prompt": "hi", "max_tokens": 4, "temperature": 0}
        want = alone(new_engine(base, root, ["r3"]), list(b"hi"), "r3", 4)[0]
        assert call(url, "/v1/completions", body)[1]["choices"][0]["text"] == want


def test_operator_limits_on_adapters_rank_size_and_waiting(http_adapters):
    base, root = http_adapters
    with serving(http_adapters, adapter_dir=[str(root)], max_rank=4, max_adapters=9) as (url, _):
        def load(name, path):
            return call(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        status, err = load("big", "r8")
        assert status == 400 and "rank 8 is over --max-rank 4" in err["error"]["message"]
        assert load("four", "r4")[0] == 200                    # the ninth adapter
        status, err = load("five", "r4")
        assert status == 400 and err["error"]["code"] == "too_many_adapters"
        assert load("four", "r3")[0] == 200                    # replacing one is not one more
    with serving(http_adapters, adapter_dir=[str(root)], max_adapter_mb=1e-4, max_waiting=0) as (url, _):
        status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "r1"})
        assert status == 413 and "--max-adapter-mb" in err["error"]["message"]
        status, err = call(url, "/v1/completions", {"model": "tiny", "prompt": "a"})
        assert status == 429 and err["error"]["code"] == "too_many_requests"


def test_a_prompt_beyond_the_context_gets_openais_code_before_taking_a_page(http):
    url, _ = http
    status, err = call(url, "/v1/completions", {"model": "r1", "prompt": "a" * 500, "max_tokens": 100})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    assert err["error"]["message"].startswith("This model's maximum context length is 512 tokens. "
                                              "However, you requested 600 tokens (500 in the prompt")
    m = scrape(url)
    assert m["pages_kv"] == 0 and m["requests_running"] == 0


@pytest.mark.parametrize("head,status,words", [
    ("", 411, "Content-Length"),
    ("Content-Length: abc\r\n", 400, "not a non-negative integer"),
    ("Content-Length: -5\r\n", 400, "not a non-negative integer"),
    ("Content-Length: 999999999999\r\n", 413, "--max-body"),
    ("Transfer-Encoding: chunked\r\n", 411, "chunked"),
])
def test_the_body_length_is_checked_before_the_body_is_read(http, head, status, words):
    url, httpd = http
    reply = raw(httpd.server_address, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    assert status_of(reply) == status and words in reply.decode(), reply
    assert call(url, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})[0] == 200


def test_slow_and_short_clients_are_cut_off_and_free_their_threads(http_adapters):
    with serving(http_adapters, header_timeout=0.5, body_timeout=0.5) as (url, httpd):
        slow = [socket.create_connection(httpd.server_address) for _ in range(20)]
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")        # headers never end
        short = socket.create_connection(httpd.server_address)
        short.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                      + b"{" * 10)                                              # 10 of 100 bytes
        assert wait_until(lambda: httpd.active == 21)
        assert call(url, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})[0] == 200
        assert wait_until(lambda: httpd.active == 0, seconds=10)             # every one cut off
        for s in slow + [short]:
            s.settimeout(5)
            try:
                assert s.recv(65536) == b"" or s.recv(65536) == b""           # closed by the server
            except ConnectionResetError:
                pass
            s.close()


def test_a_request_to_an_idle_server_wakes_the_engine_thread(http):
    url, httpd = http
    httpd.loop.idle_wait_s = 120.0
    time.sleep(1.5)                        # the engine thread now naps for up to 120 s
    start = time.monotonic()
    assert call(url, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})[0] == 200
    assert time.monotonic() - start < 60   # woken by the submit, not by the end of its nap


def test_connections_beyond_the_bound_get_503_at_once(http_adapters):
    with serving(http_adapters, max_connections=3, header_timeout=60) as (url, httpd):
        idle = [socket.create_connection(httpd.server_address) for _ in range(3)]
        assert wait_until(lambda: httpd.active == 3)
        reply = raw(httpd.server_address)
        assert status_of(reply) == 503 and b"--max-connections" in reply
        for s in idle:
            s.close()
        assert wait_until(lambda: httpd.active == 0)
        assert call(url, "/health")[0] == 200


def test_incremental_text_never_splits_a_character_and_concatenates_to_the_whole():
    tok, text = ByteTokenizer(), "a\u20acb\U0001f600c\u00e9"
    c = engine_loop.Completion(0, [], 0)
    pieces = []
    for n in range(1, len(text.encode()) + 1):
        c.ids = tok.encode(text)[:n] + ([EOS] if n == len(text.encode()) else [])
        before = c.text
        engine_loop.extend_text(c, tok, {EOS}, running=True)
        assert "\ufffd" not in c.text and c.text.startswith(before)
        pieces.append(c.text[len(before):])
    assert "".join(pieces) == c.text == text and c.decoded == len(c.ids)


def random_bad_body(rng) -> bytes:
    """A completion request with one or two fields made wrong, or bytes that are not JSON."""
    if rng.random() < 0.1:
        return rng.choice([b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"prompt": NaN}', b"1e999"])
    body = {"model": "r1", "prompt": "fuzz", "max_tokens": 6, "temperature": 0}
    values = [None, -1, 0, 1e308, float("inf"), "x", "", [], {}, [1, "a"], True, 10 ** 30, [-5],
              [10 ** 9], {"role": "robot"}, 2.5, "r9"]
    for _ in range(rng.randint(1, 2)):
        body[rng.choice(["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                         "stop", "n", "logprobs", "messages", "frobnicate"])] = rng.choice(values)
    return json.dumps(body).encode()


def test_fuzz_malformed_requests_among_good_ones_harm_none(http, http_adapters):
    url, httpd = http
    rng = random.Random(22)
    want = {name: alone(new_engine(*http_adapters, [name]), list(b"fuzz"), name, 6)[0]
            for name in ("r1", "r5")}
    jobs = [("good", name) for name in ("r1", "r5") for _ in range(20)]
    jobs += [("bad", random_bad_body(rng)) for _ in range(260)]
    rng.shuffle(jobs)

    def send(job):
        kind, what = job
        if kind == "good":
            return kind, what, call(url, "/v1/completions", {"model": what, "prompt": "fuzz",
                                                             "max_tokens": 6, "temperature": 0})
        return kind, what, call(url, "/v1/completions", what)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    for kind, what, (status, got) in results:
        if kind == "good":
            assert status == 200 and got["choices"][0]["text"] == want[what]
        elif status != 200:        # a mutation may leave a valid request; a bad one is a 4xx
            assert status in (400, 404) and set(got["error"]) == {"message", "type", "code"}, (what, got)
    m = scrape(url)
    assert m["pages_kv"] == 0 and m["requests_running"] == 0 and not httpd.loop.live


def test_sigterm_stops_the_server_as_ctrl_c_does_and_a_second_one_is_ignored():
    path = os.environ.get("LORA_MODEL_PATH")
    if not path:
        pytest.skip("needs the real model: set LORA_MODEL_PATH")
    p = subprocess.Popen([sys.executable, "serve.py", "--port", "0", "--base", path],
                         cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        line = p.stdout.readline()
        while line and "serving at" not in line:
            line = p.stdout.readline()
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        assert call(url, "/health")[0] == 200
        p.send_signal(signal.SIGTERM)
        out = p.stdout.readline()
        p.send_signal(signal.SIGTERM)        # a second one (a supervisor and timeout) is ignored
        out += p.communicate(timeout=60)[0]
    finally:
        p.kill()
    assert p.returncode == 0 and "shutting down" in out and "Traceback" not in out, out


# ------------------------------------------------------------------ the server over tensor parallelism (tp_serve.py)

TP_SERVER = """import os, pathlib, sys, time
sys.path.insert(0, {here!r})
import server, test_all, tp, tp_serve
from tokenizer import ByteTokenizer

def serve_rank(comm, root, out):
    model = test_all.tiny_llama(seed=5)
    engine = tp_serve.ReplicatedEngine(model, comm, tp.shard_model(model, comm), test_all.EOS,
                                       pool_pages=400)
    (out / f"pid{{comm.rank}}").write_text(str(os.getpid()))
    if comm.rank:
        return tp_serve.follow(engine)
    for name in ("r1", "r2", "r3", "r4"):
        engine.add_adapter(name, str(root / name))
    httpd = server.start_server(engine, ByteTokenizer(), "tiny", port=0,
                                net=server.NetworkConfig(adapter_dir=[str(root)]))
    (out / "port").write_text(str(httpd.server_address[1]))
    while not (out / "stop").exists() and httpd.loop.fatal is None:
        time.sleep(0.05)
    server.stop_server(httpd, grace_s=2.0)
    if httpd.loop.fatal:
        raise SystemExit(httpd.loop.fatal)
    engine.stop()

if __name__ == "__main__":
    root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    tp.launch(2, serve_rank, root, out, timeout_s=60, device_type="cpu")
"""


def _tp_server(tmp_path, root):
    """The server on two gloo ranks under torchrun: (process, base url)."""
    here = os.path.dirname(os.path.realpath(tp.__file__))
    script = tmp_path / "serve_ranks.py"
    script.write_text(TP_SERVER.format(here=here))
    proc = _torchrun(["--standalone", "--nproc-per-node", "2"], script, root, tmp_path)
    deadline = time.monotonic() + 90
    while not (tmp_path / "port").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)
    time.sleep(0.1)
    return proc, f"http://127.0.0.1:{(tmp_path / 'port').read_text()}"


def test_the_server_over_two_ranks_answers_as_one_device(http_adapters, tmp_path):
    """torchrun, 2 ranks, rank 0 serving: 16 concurrent clients over 4 adapters and the base get
    the text of one device; an adapter loaded over HTTP reaches both ranks (the merged model's
    tokens); stop ends every rank with exit status 0."""
    base, root = http_adapters
    proc, url = _tp_server(tmp_path, root)
    g, names = torch.Generator().manual_seed(3), [None, "r1", "r2", "r3", "r4"]
    jobs = [(torch.randint(0, 256, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist(),
             names[i % 5], 2 + i % 6) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: call(url, "/v1/completions", {
            "model": job[1] or "tiny", "prompt": job[0], "max_tokens": job[2], "temperature": 0}), jobs))
    engines = {name: new_engine(base, root, [name] if name else []) for name in names}
    for (prompt, name, n), (status, body) in zip(jobs, results):
        assert status == 200, body
        assert body["choices"][0]["text"] == alone(engines[name], prompt, name, n)[0]
    assert call(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": str(root / "r6")})[0] == 200
    status, body = call(url, "/v1/completions", {"model": "new", "prompt": [5, 6, 7], "max_tokens": 6,
                                                 "temperature": 0})
    want = [t for t in merged_alone(base, root, [5, 6, 7], "r6", 6) if t != EOS]
    assert status == 200 and body["choices"][0]["text"] == ByteTokenizer().decode(want)
    status, err = call(url, "/v1/completions", {"model": "r1", "prompt": "a", "temperature": 0.7})
    assert status == 400 and "greedily" in err["error"]["message"]
    (tmp_path / "stop").touch()
    assert proc.wait(timeout=60) == 0, proc.stdout.read()


def test_the_server_over_two_ranks_ends_with_an_error_when_a_rank_dies(http_adapters, tmp_path):
    """A rank killed: the next step's collective fails on rank 0, the request in flight fails
    (500, naming the tensor-parallel group), and the whole server ends non-zero within seconds."""
    base, root = http_adapters
    proc, url = _tp_server(tmp_path, root)
    assert call(url, "/v1/completions", {"model": "r2", "prompt": "hi", "max_tokens": 2,
                                         "temperature": 0})[0] == 200
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
    start = time.monotonic()
    try:
        status, err = call(url, "/v1/completions", {"model": "r2", "prompt": "hi", "max_tokens": 50,
                                                    "temperature": 0})
        assert status in (500, 503), err
    except (urllib.error.URLError, ConnectionError):
        pass                                    # the server was already gone
    assert proc.wait(timeout=60) != 0
    assert time.monotonic() - start < 60
    output = proc.stdout.read()
    assert "tensor-parallel group failed" in output or "SIGKILL" in output, output[-3000:]


# ------------------------------------------------------------------ devices, dtypes, presets, GPU check

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")


def test_serving_flags_reach_model_and_pool_and_bfloat16_stays_close_to_float32(monkeypatch):
    import cli
    _, b, _, _ = cli.parse([serve.TraceConfig, serve.BenchConfig, E.EngineConfig, serve.ServerConfig],
                           "", ["--device", "cpu", "--dtype", "bfloat16", "--layers", "2"])
    assert (b.device, b.dtype) == ("cpu", "bfloat16")
    monkeypatch.setattr(serve, "ModelConfig", lambda n_layers: ModelConfig.tiny(n_layers=n_layers))
    half, full = serve.base_model(b), serve.base_model(dataclasses.replace(b, dtype="float32"))
    assert half.lm_head.weight.dtype == torch.bfloat16 and full.lm_head.weight.dtype == torch.float32
    tokens = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = full(tokens), half(tokens).float()
    assert not torch.equal(got, want)                                  # it did run in bfloat16
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    adapters = serve.synthetic_adapters(3, [4, 8], full.config)
    outputs = []
    for model in (full, half):
        engine = E.Engine(model, None, pool_pages=300)
        assert engine.pool.tensor.dtype == model.lm_head.weight.dtype
        for ad in adapters:
            engine.registry.register(ad)
        outputs.append(engine.generate([[5, 6, 7, 8], [9, 10]], ["adapter-0", "adapter-2"], 5))
    assert outputs[0] == outputs[1]


@no_cuda
def test_cuda_asked_for_without_cuda_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
        serve.benchmark(serve.BenchConfig(device="cuda"), serve.TraceConfig(), E.EngineConfig())
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err
    import gpu_check
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
        gpu_check.main(gpu_check.CheckConfig(device="cuda"))
    with pytest.raises(ValueError, match="--device 'tpu'"):
        C.placement("tpu", "float32")
    with pytest.raises(SystemExit):
        train.parse_args(["--dtype", "float16"])     # float16 training would need loss scaling
    assert "--dtype must be float32 or bfloat16" in capsys.readouterr().err


def test_bfloat16_training_autocasts_but_keeps_lora_and_adamw_state_float32():
    base, _, examples = tiny_setup()
    losses, nets = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(train.parse_args(["--dtype", dtype, "--device", "cpu"]), steps=6,
                                  batch_size=4, lr=1e-2, warmup=1, dropout=0.0, log_every=100)
        net, _ = trainer.prepare(copy.deepcopy(base), cfg)
        nets[dtype] = net
        losses[dtype] = trainer.train(net, examples, cfg, log=lambda s: None)["losses"]
    assert losses["bfloat16"] != losses["float32"]                     # autocast was on
    assert abs(losses["bfloat16"][0] - losses["float32"][0]) < 0.005 * losses["float32"][0]
    assert np.allclose(losses["bfloat16"], losses["float32"], rtol=0.1)  # rounding compounds
    assert losses["bfloat16"][-1] < 0.7 * losses["bfloat16"][0]          # and it still learns
    assert all(p.dtype == torch.float32 for p in nets["bfloat16"].parameters())
    opt = trainer.make_optimizer(nets["bfloat16"], cfg)
    tokens, mask, n = sft_data.collate(examples[:2])
    trainer.train_step(nets["bfloat16"], opt, [(tokens, mask, n)], 0, cfg)
    assert {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"} == {torch.float32}


def test_paper_preset_is_table_11_and_explicit_flags_override_it():
    cfg = train.parse_args(["--preset", "paper", "--device", "cpu"])
    table_11 = dict(rank=4, alpha=32.0, targets="q,v", lr=2e-4, epochs=5, batch_size=8, grad_accum=1,
                    warmup=500, label_smoothing=0.1, weight_decay=0.01, dropout=0.1, beam=10,
                    length_penalty=0.9, no_repeat_ngram=4, dtype="bfloat16", device="cpu")
    assert {k: getattr(cfg, k) for k in table_11} == table_11
    steps = train.steps_from_epochs(cfg, 42061, {"config": {}}, log=lambda s: None).steps
    assert steps == 26289                          # ceil(5 x 42061 E2E training rows / 8)
    cfg = train.parse_args(["--preset", "paper", "--device", "cpu", "--lr", "1e-3", "--steps", "50",
                            "--dtype", "float32"])
    assert (cfg.lr, cfg.steps, cfg.epochs, cfg.dtype, cfg.rank) == (1e-3, 50, None, "float32", 4)
    assert train.parse_args(["--preset", "paper", "--device", "cpu", "--warmup=7"]).warmup == 7
    assert train.parse_args([]).epochs is None and train.parse_args([]).lr == 1e-3


def test_gpu_check_runs_small_on_a_cpu_and_reports_every_part_with_numbers(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "check.md"
    run = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--small", "--out", str(out)],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0, run.stderr[-2000:]
    report = out.read_text()
    parts = re.split(r"^## ", report, flags=re.M)[1:]
    assert [p[:3] for p in parts] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    for part in parts:
        assert "**failed**" not in part and "**stopped**" not in part, part
        assert re.search(r"^\|.* \| [-+.,e\d]+ \|", part, flags=re.M), part     # a row of numbers
    assert "FAIL" not in parts[0] and "within tolerance: PASS" in parts[0]
    assert "LoRA / base GEMM time" in parts[1] and "of its throughput with 2" in parts[2]
    assert "int8 rows" in parts[0] and "int8 rows" in parts[1] and "slora-int8 with" in parts[2]
    assert "together / one after another" in parts[4]


def test_gpu_check_reports_a_failing_or_overrunning_part_and_runs_the_next(tmp_path, monkeypatch):
    import gpu_check

    def slow(*args):
        time.sleep(5)

    def broken(*args):
        raise RuntimeError("no kernel here")

    def fine(s, device, cfg, write):
        with pytest.raises(gpu_check.TimeLimit):          # a mode's own limit inside the part's
            with gpu_check.time_limit(0.05):
                time.sleep(1)
        write("| ok | 1 |")
    monkeypatch.setattr(gpu_check, "PARTS", {"a": ("(a) slow", slow), "b": ("(b) broken", broken),
                                             "c": ("(c) fine", fine)})
    out = tmp_path / "check.md"
    start = time.monotonic()
    gpu_check.main(gpu_check.CheckConfig(device="cpu", small=True, parts="a,b,c", out=str(out),
                                         limits="a=0.2,b=5,c=5"))
    assert time.monotonic() - start < 3
    report = out.read_text()
    assert "## (a) slow\n\n\n**stopped**: past its 0.2 s limit" in report
    assert "**failed**: RuntimeError: no kernel here" in report and "| ok | 1 |" in report
