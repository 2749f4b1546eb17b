"""The test suite: CPU only, minutes not hours. `python -m pytest -q test_all.py`.

Tests that need the real model or the E2E data read LORA_MODEL_PATH and E2E_DATA (set by .ci/run
to local copies) and are skipped with a reason elsewhere. Triton kernels run on the CPU through
TRITON_INTERPRET=1, set here before triton is imported (triton.jit reads it at import).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import random  # noqa: E402
import zipfile  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import kernels  # noqa: E402
import lora  # noqa: E402
import checkpoints as C  # noqa: E402
import e2e  # noqa: E402
import model as M  # noqa: E402
import serve  # noqa: E402
import tp  # noqa: E402
import train  # noqa: E402
from lora import AdapterError, LoRAConfig, read_adapter  # noqa: E402
from lora import load_adapter, lora_layers  # noqa: E402
from checkpoints import ByteTokenizer  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402
from paging import ADAPTER, KV, HostAdapter, PageAllocator, PoolConfig, PoolFullError, UnifiedPool, kv_pages  # noqa: E402
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
    u = C.bytes_to_unicode()
    tokens = [u[b] for b in range(256)] + ["ab", "abc", "<|endoftext|>", "<|im_end|>"]
    return C.Tokenizer(tokens, [258, 259], ["a b", "ab c"], C.GPT2_PATTERN, 258, 259)


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


def test_byte_tokenizer():
    t = C.ByteTokenizer()
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
    tokens, mask, _ = next(train.batches(examples, len(examples), random.Random(0)))
    net.eval()
    with torch.no_grad():
        return train.lm_loss(net, tokens, mask, 0.0).item()


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
    assert train.load_splits(train.TrainConfig(data=str(tmp_path)), log=lambda s: None)[1] == "dev"


def test_loss_mask_covers_exactly_the_reference_and_end_token():
    tok = ByteTokenizer()
    ids, n_prompt = train.encode_example(tok, "name[A]", "A.", 64)
    assert ids == list(b"name[A]\n A.") + [tok.eos_id] and n_prompt == len("name[A]\n")
    tokens, mask, n_real = next(train.batches([(ids, n_prompt)], 1, random.Random(0)))
    assert tokens[0, 1:][mask[0]].tolist() == list(b" A.") + [tok.eos_id] and n_real == len(ids)


@pytest.mark.skipif(not os.environ.get("E2E_DATA"), reason="E2E_DATA (folder with the E2E CSV files) is not set")
def test_real_test_split_counts():
    groups = e2e.group_refs(e2e.read_e2e(os.path.join(os.environ["E2E_DATA"], "testset_w_refs.csv")))
    assert len(groups) == 630 and sum(len(r) for _, r in groups) == 4693


# ------------------------------------------------------------------------------------ training

def test_lora_training_lowers_loss_changes_only_lora_and_reloads(tmp_path):
    base, tok, examples = tiny_setup()
    cfg = train.TrainConfig(steps=40, batch_size=4, lr=3e-2, warmup=2, rank=4, dropout=0.0, log_every=100)
    net, lcfg = train.prepare(copy.deepcopy(base), cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss0 = fixed_batch_loss(net, examples)
    train.train(net, examples, cfg, log=lambda s: None)
    assert fixed_batch_loss(net, examples) < 0.6 * loss0
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert len(changed) == 2 * len(lora_layers(net)) == 2 * 2 * 2    # A and B of q, v in 2 layers

    train.save_adapter(net, tmp_path, lcfg)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    fresh.eval()
    mrs = [mr for mr, _ in PAIRS[2:]]
    cfg_eval = train.TrainConfig(max_new_tokens=12, eval_batch=2)
    assert train.generate_outputs(fresh, tok, mrs, cfg_eval) == train.generate_outputs(net, tok, mrs, cfg_eval)
    tokens = torch.tensor([examples[0][0]])
    assert torch.allclose(fresh(tokens), net(tokens), atol=1e-5)


def test_full_method_trains_every_weight():
    base, _, _ = tiny_setup()
    net, lcfg = train.prepare(copy.deepcopy(base), train.TrainConfig(method="full"))
    trainable, total = train.count_parameters(net)
    assert lcfg is None and trainable == total == sum(p.numel() for p in base.parameters())


def test_run_one_writes_checkpoint_predictions_and_row(tmp_path):
    base, tok, examples = tiny_setup()
    groups = e2e.group_refs(PAIRS)
    cfg = train.TrainConfig(steps=2, batch_size=2, max_new_tokens=8, log_every=1)
    row = train.run_one(base, tok, examples, groups, cfg, str(tmp_path), log=lambda s: None)
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len((tmp_path / "predictions.txt").read_text().split("\n")) == len(groups) + 1
    # q: A [4, 48] + B [48, 4]; v: A [4, 48] + B [16, 4] (kv_dim 16), in 2 layers
    assert row["trainable"] == 2 * (4 * 48 + 48 * 4 + 4 * 48 + 16 * 4) and row["checkpoint_mb"] > 0
    assert set(train.COLUMNS) <= set(row) and "method" in train.table([row])


def test_beam_of_one_is_greedy_and_ngram_ban():
    base, tok, _ = tiny_setup(seed=3)
    prompt = tok.encode("name[Aromi]\n")
    cfg = train.TrainConfig(beam=1, no_repeat_ngram=0, max_new_tokens=10)
    greedy = base.generate([prompt], 10, eos_id=tok.eos_id)[0]
    assert train.beam_search(base, prompt, cfg, tok.eos_id) == [t for t in greedy if t != tok.eos_id]
    assert train.repeated_ngram_ban([1, 2, 3, 1, 2], 3) == {3}
    assert train.repeated_ngram_ban([1, 2, 3], 3) == set()
    out = train.beam_search(base, prompt, train.TrainConfig(beam=3, no_repeat_ngram=2, max_new_tokens=12), tok.eos_id)
    bigrams = list(zip(out, out[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_cli_flags_come_from_the_config():
    assert train.parse_args([]) == train.TrainConfig()
    cfg = train.parse_args(["--targets", "q,k,v,o", "--eval-limit", "5", "--no-baseline", "--method", "full"])
    assert (cfg.targets, cfg.eval_limit, cfg.no_baseline, cfg.method) == ("q,k,v,o", 5, True, "full")


@pytest.mark.skipif(not os.environ.get("LORA_MODEL_PATH"), reason="LORA_MODEL_PATH (the real model) is not set")
def test_real_model_lora_parameter_count():
    net, tok = train.load_model(os.environ["LORA_MODEL_PATH"])
    net, _ = train.prepare(net, train.TrainConfig())
    # r=4 on q (576 -> 576) and v (576 -> 192) in 30 layers: A [4, 576] and B [out, 4] each
    assert train.count_parameters(net)[0] == 30 * (4 * 576 + 576 * 4 + 4 * 576 + 192 * 4) == 230_400
    ids, n_prompt = train.encode_example(tok, "name[Aromi]", "Aromi.", 64)
    assert tok.decode(ids[n_prompt:-1]) == " Aromi." and ids[-1] == tok.eos_id


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
    monkeypatch.setattr(train, "load_model", lambda path: (base, tok))
    cfg = train.TrainConfig(data=str(data), out=str(tmp_path / "out"), sweep=True, steps=1, batch_size=2,
                            eval_limit=2, baseline_limit=1, max_new_tokens=4)
    lines = []
    results = train.main(cfg, log=lines.append)
    grid = [(r["rank"], r["targets"]) for r in results["runs"]]
    assert grid == [(r, t) for t in ("q", "q,v", "q,k,v,o") for r in (1, 2, 4, 8, 64)]
    assert results["train_split"] == "dev" and results["test_mrs"] == 2 and "dev" in lines[0]
    assert results["baseline"]["method"] == "base, 1 MRs"
    assert os.path.isfile(tmp_path / "out" / "r64_qkvo" / "adapter" / "adapter_config.json")
    assert not lora_layers(base)                                      # the base model is never modified


def test_main_scores_a_saved_adapter_like_the_run_that_made_it(tmp_path, monkeypatch):
    base, tok, _ = tiny_setup()
    data = tmp_path / "e2e"
    data.mkdir()
    (data / "testset_w_refs.csv").write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS))
    (data / "trainset.csv").write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS))
    monkeypatch.setattr(train, "load_model", lambda path: (base, tok))
    common = dict(data=str(data), steps=3, batch_size=2, lr=3e-2, max_new_tokens=6, no_baseline=True)
    trained = train.main(train.TrainConfig(out=str(tmp_path / "a"), **common), log=lambda s: None)
    loaded = train.main(train.TrainConfig(out=str(tmp_path / "b"), adapter=str(tmp_path / "a" / "adapter"), **common),
                        log=lambda s: None)
    assert trained["train_split"] == "train"
    assert (tmp_path / "a" / "predictions.txt").read_text() == (tmp_path / "b" / "predictions.txt").read_text()
    run, again = trained["runs"][0], loaded["runs"][0]
    assert (again["rank"], again["targets"], again["trainable"]) == (4, "q,v", run["trainable"])
    assert again["BLEU"] == pytest.approx(run["BLEU"])


# ------------------------------------------------------------------------------ kernels (kernels.py): Triton in its interpreter vs references vs dense math

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
    args = (ad.pool, ad.page_ids, ad.a_start, ad.ranks, ids, 128)
    z = kernels.lora_shrink(x, *args, use_triton=True)
    torch.testing.assert_close(z, kernels.lora_shrink_ref(x, *args), atol=1e-5, rtol=1e-5)
    eargs = (ad.pool, ad.page_ids, ad.b_start, ad.ranks, ad.scales, ids, out_dim)
    delta = kernels.lora_expand(z, *eargs, use_triton=True)
    assert delta.dtype == dtype and delta.shape == (N, out_dim)
    torch.testing.assert_close(delta.double().cpu(), dense_lora(x, ad, ids), **TOL[dtype])
    torch.testing.assert_close(delta, kernels.lora_expand_ref(z, *eargs), **TOL[dtype])
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
    z_tok = kernels.lora_shrink(x, ad.pool, ad.page_ids, ad.a_start, ad.ranks, ids, 40,
                                use_triton=True)
    sargs = (ad.pool, ad.page_ids, ad.a_start, ad.ranks, seg_starts, seg_adapter, 40)
    z_seg = kernels.lora_shrink_segments(xs, *sargs, use_triton=True)
    torch.testing.assert_close(z_seg, z_tok[order], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z_seg, kernels.lora_shrink_segments_ref(xs, *sargs),
                               atol=1e-4, rtol=1e-5)
    d_tok = kernels.lora_expand(z_tok, ad.pool, ad.page_ids, ad.b_start, ad.ranks, ad.scales,
                                ids, O, use_triton=True)
    eargs = (ad.pool, ad.page_ids, ad.b_start, ad.ranks, ad.scales, seg_starts, seg_adapter, O)
    d_seg = kernels.lora_expand_segments(z_seg, *eargs, use_triton=True)
    torch.testing.assert_close(d_seg, d_tok[order], **TOL[dtype])
    torch.testing.assert_close(d_seg, kernels.lora_expand_segments_ref(z_seg, *eargs), **TOL[dtype])
    torch.testing.assert_close(d_seg.double().cpu(), dense_lora(xs, ad, ids[order]), **TOL[dtype])


def test_every_output_element_is_written():
    """Outputs handed in NaN-filled: rank-0 tokens, rows past the rank and masked tails must all
    be overwritten (with zeros where nothing is computed)."""
    H, N, O = 24, 9, 20
    ad = make_lora(H, O, [0, 3, 18], torch.float32, seed=4)
    ids = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0, 0], dtype=torch.int32, device=DEV)
    x = torch.randn(N, H, device=DEV)
    nan = lambda *shape: torch.full(shape, float("nan"), device=DEV)   # noqa: E731
    z = kernels.lora_shrink(x, ad.pool, ad.page_ids, ad.a_start, ad.ranks, ids, 20,
                            out=nan(N, 20), use_triton=True)
    d = kernels.lora_expand(z, ad.pool, ad.page_ids, ad.b_start, ad.ranks, ad.scales, ids, O,
                            out=nan(N, O), use_triton=True)
    order, seg_starts, seg_adapter = segments_of(ids)
    zs = kernels.lora_shrink_segments(x[order], ad.pool, ad.page_ids, ad.a_start, ad.ranks,
                                      seg_starts, seg_adapter, 20, out=nan(N, 20), use_triton=True)
    ds = kernels.lora_expand_segments(zs, ad.pool, ad.page_ids, ad.b_start, ad.ranks, ad.scales,
                                      seg_starts, seg_adapter, O, out=nan(N, O), use_triton=True)
    for out in (z, d, zs, ds):
        assert torch.isfinite(out).all()
    assert (z[ids == 0] == 0).all() and (z[ids == 1, 3:] == 0).all() and (d[ids == 0] == 0).all()
    kv = make_kv([4, 1], n_heads=4, n_kv_heads=2, head_dim=6, dtype=torch.float32)
    a = kernels.paged_attention_decode(kv.q[[3, 4]], kv.pool, kv.block_table, kv.lens,
                                       2, out=nan(2, 4, 6), use_triton=True)
    p = kernels.paged_attention_prefill(kv.q, kv.pool, kv.block_table, kv.seq_ids, kv.positions,
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
    step = kernels.plan_lora(ad.pool, ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales, *segments, 17,
                             per_token=per_token)
    assert [(t0, t1) for t0, t1, *_ in step.runs] == [(0, 2), (3, 6), (6, 7), (7, 9)]   # base run skipped
    assert all(isinstance(rows, slice) == consecutive for run in step.runs for rows in run[2:4])
    want = dense_lora(x, ad, ids)
    for use_triton in (False, True):
        delta = kernels.lora_apply(x, ad.pool, step, O, use_triton=use_triton)
        assert delta.dtype == dtype
        torch.testing.assert_close(delta.double(), want, **TOL[dtype])
    with pytest.raises(ValueError, match=r"page_ids\[\d+\] = \d+ is outside \[0, 30\)"):   # checked once, here
        kernels.plan_lora(ad.pool[:30], ad.page_ids, ad.a_start, ad.b_start, ad.ranks, ad.scales, *segments, 17)
    with pytest.raises(ValueError, match="does not fit a step of 9 tokens"):
        kernels.lora_apply(x[:5], ad.pool, step, O)


def test_bad_arguments_raise_clear_errors():
    ad = make_lora(16, 16, [0, 2, 3], torch.float32, seed=5)
    x, ids = torch.randn(4, 16, device=DEV), torch.tensor([0, 1, 2, 1], device=DEV)
    shrink = lambda **kw: kernels.lora_shrink(**{**dict(   # noqa: E731
        x=x, pool_l=ad.pool, page_ids=ad.page_ids, a_start=ad.a_start, ranks=ad.ranks,
        adapter_ids=ids, max_rank=4), **kw})
    with pytest.raises(ValueError, match=r"adapter_ids\[2\] = 7"):
        shrink(adapter_ids=torch.tensor([0, 1, 7, 1], device=DEV))
    with pytest.raises(ValueError, match=r"page_ids\[1\] = 999"):
        shrink(page_ids=torch.cat([ad.page_ids[:1], ad.page_ids.new_tensor([999]),
                                   ad.page_ids[2:]]))
    with pytest.raises(ValueError, match=r"a_start \+ ranks\[2\] = 11"):   # 10 pages, rank 3
        shrink(a_start=torch.tensor([0, 0, 8], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match=r"ranks\[2\] = 3"):
        shrink(max_rank=2)
    with pytest.raises(ValueError, match="pool_l .* does not fit x"):
        shrink(pool_l=ad.pool.half())
    with pytest.raises(ValueError, match="x must be 2-D"):
        shrink(x=x[None])
    with pytest.raises(ValueError, match=r"seg_starts \(last\)"):
        kernels.lora_shrink_segments(x, ad.pool, ad.page_ids, ad.a_start, ad.ranks,
                                     torch.tensor([0, 2, 3], device=DEV),
                                     torch.tensor([1, 2], device=DEV), 4)
    with pytest.raises(ValueError, match="out_dim"):
        kernels.lora_expand(torch.zeros(4, 4, device=DEV), ad.pool, ad.page_ids, ad.b_start,
                            ad.ranks, ad.scales, ids, 17)
    kv = make_kv([4, 1], n_heads=4, n_kv_heads=2, head_dim=6, dtype=torch.float32)
    q2 = kv.q[[3, 4]]
    with pytest.raises(ValueError, match=r"block_table\[0, 1, 0\] = 50"):
        bad = kv.block_table.clone()
        bad[0, 1, 0] = 50
        kernels.paged_attention_decode(q2, kv.pool, bad, kv.lens, 2)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 9"):
        kernels.paged_attention_decode(q2, kv.pool, kv.block_table, kv.lens.new_tensor([4, 9]), 2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        kernels.paged_attention_decode(q2, kv.pool, kv.block_table, kv.lens, 3)
    with pytest.raises(ValueError, match=r"seq_ids\[0\] = 2"):
        kernels.paged_attention_prefill(kv.q, kv.pool, kv.block_table, kv.seq_ids + 2,
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
    kernels.write_kv(pool, k, v, block_table, seq_ids, positions)
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
    pre = kernels.paged_attention_prefill(kv.q[rows], *pargs, use_triton=True)
    torch.testing.assert_close(pre.double().cpu(), dense_attention(kv, rows).cpu(), **tol)
    torch.testing.assert_close(pre, kernels.paged_attention_prefill_ref(kv.q[rows], *pargs), **tol)
    # decode: one query per request at a chosen position, attending to positions 0..pos
    last = torch.tensor([0, 5, 47], device=DEV)                  # positions 0, 4, 39
    seq_lens = kv.positions[last] + 1
    dargs = (kv.pool, kv.block_table, seq_lens, 2)
    dec = kernels.paged_attention_decode(kv.q[last], *dargs, use_triton=True)
    torch.testing.assert_close(dec.double().cpu(), dense_attention(kv, last).cpu(), **tol)
    torch.testing.assert_close(dec, kernels.paged_attention_decode_ref(kv.q[last], *dargs), **tol)
    same = (rows == 47).nonzero()[0, 0]                           # token 47 in both batches
    torch.testing.assert_close(dec[2], pre[same], atol=1e-6, rtol=1e-6)


def test_full_prefill_then_decode_agree_without_gqa():
    kv = make_kv([3, 4], n_heads=2, n_kv_heads=2, head_dim=16, dtype=torch.float32)  # g = 1
    rows = torch.arange(7, device=DEV)
    pre = kernels.paged_attention_prefill(kv.q, kv.pool, kv.block_table, kv.seq_ids,
                                          kv.positions, 2, use_triton=True)
    torch.testing.assert_close(pre.double().cpu(), dense_attention(kv, rows).cpu(),
                               atol=1e-5, rtol=1e-5)
    dec = kernels.paged_attention_decode(kv.q[[2, 6]], kv.pool, kv.block_table, kv.lens, 2,
                                         use_triton=True)
    torch.testing.assert_close(dec, pre[[2, 6]], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ unified pool (paging.py) and scheduler (scheduler.py)

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


# ------------------------------------------------------------------------------ paging

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
    with pytest.raises(ValueError, match=r"'bad'.*'gate_proj'"):
        make_adapter("bad", 2, ("q_proj", "gate_proj"))


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


# ------------------------------------------------------------------------------ scheduler

def sched(pages=100, policy="fcfs", **kw):
    return Scheduler(SchedulerConfig(policy=policy, **kw), pages, G, {"x": 8, "y": 8, "z": 8})


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
    s.fail(b, 0.05)                                   # e.g. its adapter could not be loaded
    assert s.advance(step, 0.1) == [] and s.running == [a] and b.state == State.FAILED and b.n_generated == 0
    assert s.reserved_pages() == 2 * 2 + 8            # 2 ceil(5/3) KV pages + adapter x only


def test_prompt_that_can_never_fit_is_rejected_at_submission():
    s = sched(pages=20, max_prefill_tokens=30)
    too_big = Request(0, 25, 10, "x")                 # 2 ceil(35/3) + 8 = 32 > 20 pages
    with pytest.raises(RequestRejected, match="whole pool"):
        s.submit(too_big)
    assert too_big.state == State.FAILED and s.idle()
    with pytest.raises(RequestRejected, match="unknown adapter"):
        s.submit(Request(1, 2, 2, "nope"))
    with pytest.raises(RequestRejected, match="max_prefill_tokens"):
        Scheduler(SchedulerConfig(max_prefill_tokens=4), 100, G, {}).submit(Request(2, 5, 1))


def test_full_pool_makes_requests_wait_and_none_is_lost():
    s = sched(pages=30)                                 # each request: 2 ceil(9/3) = 6 KV pages + adapter
    reqs = [Request(i, 5, 4, "xyz"[i % 3], arrival=0.0) for i in range(8)]
    for r in reqs:
        s.submit(r)
    step, now, running_sizes = s.schedule(0.0), 0.0, []
    assert [r.id for r in step.prefill] == [0, 1]     # 6+8 + 6+8 = 28 <= 30; a third needs 14 more
    while not s.idle():
        assert s.reserved_pages() <= 30
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
    s = Scheduler(cfg, P, G, {a.name: a.n_pages for a in ads})
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
        assert st.used + st.free == P and st.kv + st.adapter == st.used and s.reserved_pages() <= P
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


# ------------------------------------------------------------------------------ serving (serve.py)

ADAPTER_SPECS = {"a": (2, ("q_proj", "v_proj")), "b": (5, ("q_proj", "k_proj", "v_proj", "o_proj")),
                 "c": (1, ("o_proj",)), "d": (8, ("k_proj",))}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny base model and four PEFT adapters of different ranks and targets on disk."""
    base, root = tiny_llama(), tmp_path_factory.mktemp("adapters")
    for i, (name, (r, targets)) in enumerate(ADAPTER_SPECS.items()):
        m, cfg = copy.deepcopy(base), LoRAConfig(r=r, alpha=2 * r, targets=targets)
        lora.add_lora(m, cfg)
        randomize_lora(m, seed=10 + i)
        lora.save_adapter(m, root / name, cfg)
    return base, root


def merged_alone(base, root, prompt, name, n):
    """The reference: the request alone on the base model with its adapter merged into the weights."""
    m = copy.deepcopy(base)
    if name is not None:
        lora.load_adapter(m, root / name)
        lora.merge_lora(m)
    return m.generate([prompt], n)[0]


def mixed_requests(n=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    names = [None, "a", "b", "c", "d"]
    return [(torch.randint(0, 259, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
             names[i % 5], 3 + i % 6) for i in range(n)]


@pytest.mark.parametrize("mode", serve.MODES)
def test_mixed_batch_equals_each_request_alone_with_its_adapter_merged(served, mode):
    base, root = served
    engine = serve.Engine(base, None, mode=mode, pool_pages=400)
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, str(root / name))
    reqs, ids = mixed_requests(), []
    for i, (prompt, name, n) in enumerate(reqs):   # arrivals spread over the run
        ids.append(engine.submit(prompt, name, n))
        if i % 3 == 2:
            engine.step(), engine.step()
    while engine.step() or engine.pending():
        pass
    for rid, (prompt, name, n) in zip(ids, reqs):
        assert engine.tokens[rid][len(prompt):] == merged_alone(base, root, prompt, name, n), (mode, name)
    stats = engine.pool.stats()
    assert stats.kv == 0 and stats.free + stats.adapter == stats.total
    x = torch.randint(0, 259, (1, 5))
    assert torch.equal(base(x), tiny_llama()(x))                   # the merged mode restored the weights


def test_unknown_adapter_and_oversized_prompt_fail_alone(served):
    base, root = served
    engine = serve.Engine(base, None, pool_pages=60)
    engine.add_adapter("a", str(root / "a"))
    out = engine.generate([[1, 2, 3], [4, 5], list(range(200))], ["a", "nope", None], 4)
    assert out[0] == merged_alone(base, root, [1, 2, 3], "a", 4)
    assert isinstance(out[1], serve.Failed) and "unknown adapter 'nope'" in out[1].reason
    assert isinstance(out[2], serve.Failed) and "more than the whole pool" in out[2].reason


def test_bad_adapter_refused_at_registration_others_still_served(served, tmp_path):
    base, root = served
    engine = serve.Engine(base, None, pool_pages=200)
    engine.add_adapter("a", str(root / "a"))
    _write_adapter(tmp_path / "broken", {"use_dora": True})
    with pytest.raises(AdapterError, match="use_dora"):
        engine.add_adapter("broken", str(tmp_path / "broken"))
    wide = copy.deepcopy(base)
    lora.add_lora(wide, LoRAConfig(r=2, targets=("gate_proj",)))
    lora.save_adapter(wide, tmp_path / "mlp", LoRAConfig(r=2, targets=("gate_proj",)))
    with pytest.raises(AdapterError, match="gate_proj"):
        engine.add_adapter("mlp", str(tmp_path / "mlp"))
    assert engine.generate([[7, 8, 9]], ["a"], 3)[0] == merged_alone(base, root, [7, 8, 9], "a", 3)


def test_full_pool_makes_requests_wait_and_loses_nothing(served):
    base, root = served
    # 60 pages: adapter b takes 40, each request reserves 2 ceil((prompt + new) / 3) KV pages
    engine = serve.Engine(base, None, pool_pages=60)
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, str(root / name))
    reqs = mixed_requests(10, seed=3)
    out = engine.generate([p for p, _, _ in reqs], [a for _, a, _ in reqs], 6)
    assert out == [merged_alone(base, root, p, a, 6) for p, a, _ in reqs]
    assert max(st.tokens for st in engine.step_times) < sum(len(p) for p, _, _ in reqs)   # never all at once
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


def test_1000_request_trace_ends_with_every_page_free(served):
    base, root = served
    engine = serve.Engine(base, None, pool_pages=150, ttft_slo=0.5, policy="cluster")
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, str(root / name))
    t = serve.TraceConfig(rate=4000.0, duration=0.25, input_len="1,6", output_len="1,3", seed=2)
    trace = serve.make_trace(t, vocab_size=259)
    names = [[None, "a", "b", "c", "d"][r["adapter"] % 5] for r in trace]
    stats = serve.replay(engine, trace, names, slo=0.5)
    states = [r.state for r in engine.requests.values()]
    assert len(states) == 1000 and set(states) <= {State.FINISHED, State.ABORTED}
    assert stats["aborted"] == states.count(State.ABORTED)
    assert engine.pool.stats().kv == 0 and engine.pool.stats().free + engine.pool.stats().adapter == 150
    assert all(res.refs == 0 for res in engine.pool.resident.values())


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
    """PEFT adapters with random A and B (B is zero at initialisation) on disk, and a broken one."""
    root = tmp_path_factory.mktemp("tp_adapters")
    for i, (name, (r, targets)) in enumerate(SPECS.items()):
        m, cfg = base_model(), LoRAConfig(r=r, alpha=2 * r, targets=targets)
        lora.add_lora(m, cfg)
        torch.manual_seed(10 + i)
        for layer in lora.lora_layers(m).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        lora.save_adapter(m, root / name, cfg)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text(json.dumps({"r": 2, "target_modules": ["q_proj"]}))
    return root


def requests():
    g = torch.Generator().manual_seed(1)
    names = [None, "a", "b", "c", "d"]
    return [(torch.randint(0, 259, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
             names[i % 5], 3 + i % 6) for i in range(12)]


def serve_requests(engine, root, adapter_dir=lambda name: name):
    """Register the adapters, submit the requests in waves between steps, run to the end.
    Returns the new tokens, the logits of every step [rows, V] and, per step, (tokens, adapters used)."""
    for name in SPECS:
        engine.add_adapter(name, str(root / adapter_dir(name)))
    logits, steps = [], []
    forward, make_lora = engine.model.forward_paged, engine._lora

    def recording_forward(batch, pool, lora_fn=None):
        logits.append(forward(batch, pool, lora_fn).clone())
        return logits[-1]

    def recording_lora(batch, *rest):   # Engine._lora(batch, ..., names)
        steps.append((int(batch.tokens.numel()), list(rest[-1])))
        return make_lora(batch, *rest)

    engine.model.forward_paged, engine._lora = recording_forward, recording_lora
    reqs, ids = requests(), []
    for i, (prompt, name, n) in enumerate(reqs):
        ids.append(engine.submit(prompt, name, n))
        if i % 3 == 2:
            engine.step(), engine.step()
    while engine.step() or engine.pending():
        pass
    return [engine.tokens[k][len(p):] for k, (p, _, _) in zip(ids, reqs)], torch.cat(logits), steps


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
    tokens, logits, steps = serve_requests(serve.Engine(base_model(), None, pool_pages=300), root)
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
