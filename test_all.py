"""The test suite: CPU only, minutes not hours. `python -m pytest -q test_all.py`.

Tests that need the real model or the E2E data read LORA_MODEL_PATH and E2E_DATA (set by .ci/run
to local copies) and are skipped with a reason elsewhere. Triton kernels run on the CPU through
TRITON_INTERPRET=1, set here before triton is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import lora  # noqa: E402
import model as M  # noqa: E402
from lora import LoRAConfig, AdapterError  # noqa: E402

REAL_MODEL = os.environ.get("LORA_MODEL_PATH")
needs_real_model = pytest.mark.skipif(not REAL_MODEL, reason="LORA_MODEL_PATH not set (path of the SmolLM2 GGUF)")


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    return M.Llama(M.ModelConfig.tiny(**kw)).eval()


@pytest.fixture(scope="module")
def real():
    if not REAL_MODEL:
        pytest.skip("LORA_MODEL_PATH not set (path of the SmolLM2 GGUF)")
    return M.load_model(REAL_MODEL)


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


def _write_adapter(path, conf=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps({**base, **(conf or {})}))
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
    "layer the model lacks": lambda t: t.update({
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(48, 2)}),
}
BAD_CONFIGS = {"dora": {"use_dora": True}, "modules_to_save": {"modules_to_save": ["lm_head"]},
               "bias": {"bias": "all"}, "target the model lacks": {"target_modules": ["q_proj", "c_attn"]},
               "not lora": {"peft_type": "IA3"}, "no rank": {"r": 0}}


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
    with pytest.raises(AdapterError, match="bad"):  # the message names the file
        lora.load_adapter(m, tmp_path / "bad")
    assert not lora.lora_layers(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    lora.load_adapter(m, good)                                    # the good one still loads


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
    u = M.bytes_to_unicode()
    tokens = [u[b] for b in range(256)] + ["ab", "abc", "<|endoftext|>", "<|im_end|>"]
    return M.Tokenizer(tokens, [258, 259], ["a b", "ab c"], M.GPT2_PATTERN, 258, 259)


def test_hf_format_round_trip(tmp_path):
    tok = tiny_bpe_tokenizer()
    m = tiny_llama(vocab_size=tok.vocab_size)
    M.save_hf(m, tmp_path, tok)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["num_key_value_heads"] == 2
    m2, tok2 = M.load_model(str(tmp_path))
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
    inverse = {v: k for k, v in M.GGUF_NAMES.items()}
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
    loaded, tok2 = M.load_model(path)
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


def test_byte_tokenizer():
    t = M.ByteTokenizer()
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
    "naïve café – 東京 Привет мир 🤗": [3546, 46494, 37366, 816, 17097, 247, 126, 16736, 122, 5470, 249, 46879, 16464,
                                      32547, 41337, 7872, 9175, 15107, 114, 241],
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
