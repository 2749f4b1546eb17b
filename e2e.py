"""The E2E NLG challenge's data and its metrics (Novikova et al. 2017), as the LoRA paper scores it.

Hu et al. 2021 (arXiv 2106.09685), section 5.4 and Table 3 adapt GPT-2 to E2E NLG: a restaurant
meaning representation (MR) -> one English sentence, scored against every reference of the MR with
the challenge's metrics:
- BLEU-4 and NIST-5 as mteval-v13a (its tokenisation, corpus level, all references of an MR,
  closest reference length for the brevity penalty). BLEU is case-sensitive, as sacrebleu's
  default; BLEU_lc and NIST are lowercased, as the challenge's script runs mteval (no -c flag).
- ROUGE-L (beta 1.2) and CIDEr as in the MS-COCO caption scorer the challenge uses; its CIDEr is
  the CIDEr-D form (clipped n-gram counts, Gaussian length penalty sigma 6, times 10).
Simplified: METEOR is left out (it needs Java); the COCO scorers' Java PTB tokeniser is replaced by
the 13a tokens, lowercased, without punctuation.
Data: the challenge's CSV files (columns mr,ref), downloaded from its release when missing.
Demo: `python -c "import e2e; print(e2e.bleu(['a cat sat'], [['a cat sat']]))"` (100.0).
"""
import csv
import io
import math
import os
import re
import shutil
import urllib.request
import zipfile
from collections import Counter


# ------------------------------------------------------------------------------------ data

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_FILES = ("trainset.csv", "devset.csv", "testset_w_refs.csv")


class DataError(RuntimeError):
    """The E2E files are missing or malformed; the message names the files and what to do."""


def http_fetch(url, dest):
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def ensure_data(root, fetch=http_fetch) -> dict:
    """{"train"/"dev"/"test": path or None}; downloads and unpacks the release when the test split
    is missing from `root` (the zip nests the CSVs in a folder, so they are flattened into root)."""
    if not os.path.isfile(os.path.join(root, "testset_w_refs.csv")):
        os.makedirs(root, exist_ok=True)
        zip_path = os.path.join(root, "e2e-dataset.zip")
        try:
            fetch(E2E_URL, zip_path)
            with zipfile.ZipFile(zip_path) as z:
                for member in z.namelist():
                    if os.path.basename(member) in E2E_FILES:
                        with z.open(member) as src, open(os.path.join(root, os.path.basename(member)), "wb") as dst:
                            shutil.copyfileobj(src, dst)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"E2E data not found in {root} (expected {', '.join(E2E_FILES)}) and the download of "
                            f"{E2E_URL} failed: {e}. Unzip that release into {root}, or point --data or E2E_DATA "
                            "at a folder holding the files.") from None
    paths = [os.path.join(root, name) for name in E2E_FILES]
    if not os.path.isfile(paths[2]):
        raise DataError(f"{paths[2]}: missing after unpacking {E2E_URL}")
    return {split: (p if os.path.isfile(p) else None) for split, p in zip(("train", "dev", "test"), paths)}


def read_e2e(path) -> list:
    """[(mr, ref)] from an E2E CSV with columns mr,ref (quoted fields may hold commas); DataError
    naming the file and line for bytes that are not UTF-8, a missing cell, or no rows at all."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte {raw[e.start]:#x}); save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
        raise DataError(f"{path}: expected a header with columns mr,ref, got {reader.fieldnames}")
    rows = []
    for row in reader:
        mr, ref = (row[k].strip() if isinstance(row[k], str) else "" for k in ("mr", "ref"))
        if not mr or not ref:
            raise DataError(f"{path}, line {reader.line_num}: the {'mr' if not mr else 'ref'} cell is empty or missing")
        rows.append((mr, ref))
    if not rows:
        raise DataError(f"{path}: a header and no rows")
    return rows


def group_refs(rows) -> list:
    """[(mr, [ref, ...])], MRs in order of first appearance, every reference of an MR together."""
    groups = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())


# ------------------------------------------------------------------------------------ metrics

# mteval-v13a tokenisation: split off the ASCII symbols { | } ~ [ \ ] ^ _ ` ! " # $ % & ( ) * + : ; < = > ? @ /
# always, period and comma unless between digits, and a dash after a digit.
_SYMBOLS = re.compile(r"""([{|}~\[\\\]^_`!"#$%&()*+:;<=>?@/])""")
_PUNCT = set(".,?!:;-'\"`()[]{}")  # dropped by the COCO scorers' tokeniser


def tokenize_13a(text, lowercase=False) -> list:
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for sgml, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(sgml, char)
    text = f" {text.lower() if lowercase else text} "
    text = _SYMBOLS.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def ngrams(words, n) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def max_ref_counts(refs, n) -> Counter:
    """Each n-gram's largest count in any one reference (the clip of modified precision)."""
    out = Counter()
    for r in refs:
        out |= ngrams(r, n)
    return out


def bleu(hyps, refs, lowercase=False, max_n=4) -> float:
    """Corpus BLEU (Papineni 2002) in [0, 100]: exp(mean_n log p_n) * min(1, exp(1 - r/c)), p_n the
    clipped n-gram precision over the corpus, r the sum of closest reference lengths (ties: shorter)."""
    match, total, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for h, rs in zip(hyps, refs):
        h, rs = tokenize_13a(h, lowercase), [tokenize_13a(r, lowercase) for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            match[n - 1] += sum((ngrams(h, n) & max_ref_counts(rs, n)).values())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / max_n
    return 100 * math.exp(log_p + min(0.0, 1 - ref_len / hyp_len))


def nist(hyps, refs, max_n=5) -> float:
    """NIST (Doddington 2002): sum_n [sum of Info over matched n-grams / hypothesis n-grams] times
    exp(beta log^2 min(1, c / r_avg)), Info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all
    references, beta such that the penalty is 0.5 at c / r_avg = 2/3. Lowercased, as mteval."""
    toks = [(tokenize_13a(h, True), [tokenize_13a(r, True) for r in rs]) for h, rs in zip(hyps, refs)]
    counts = Counter()                       # reference n-gram counts; () counts reference words
    for _, rs in toks:
        for r in rs:
            counts[()] += len(r)
            for n in range(1, max_n + 1):
                counts.update(ngrams(r, n))
    gain, total, hyp_len, ref_len = [0.0] * max_n, [0] * max_n, 0, 0.0
    for h, rs in toks:
        hyp_len, ref_len = hyp_len + len(h), ref_len + sum(map(len, rs)) / len(rs)
        for n in range(1, max_n + 1):
            hits = ngrams(h, n) & max_ref_counts(rs, n)
            gain[n - 1] += sum(c * math.log2(counts[g[:-1]] / counts[g]) for g, c in hits.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    beta = math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(beta * math.log(min(1.0, hyp_len / ref_len)) ** 2) if hyp_len else 0.0
    return penalty * sum(g / max(t, 1) for g, t in zip(gain, total))


def coco_tokens(text) -> list:
    return [w for w in tokenize_13a(text, lowercase=True) if not set(w) <= _PUNCT]


def lcs(a, b) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0                                 # row[j-1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hyps, refs, beta=1.2) -> float:
    """Mean over MRs of F_beta(max_refs precision, max_refs recall) of the longest common
    subsequence (Lin 2004), as the COCO scorer; in [0, 100]."""
    scores = []
    for h, rs in zip(hyps, refs):
        h, rs = coco_tokens(h), [coco_tokens(r) for r in rs]
        common = [lcs(h, r) for r in rs]
        p = max(c / len(h) if h else 0.0 for c in common)
        rec = max(c / len(ref) if ref else 0.0 for c, ref in zip(common, rs))
        scores.append((1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if p and rec else 0.0)
    return 100 * sum(scores) / len(scores)


def cider(hyps, refs, max_n=4, sigma=6.0) -> float:
    """CIDEr-D (Vedantam 2015) as the COCO scorer: per n, TF-IDF vectors g (IDF from the MRs'
    references), clipped cosine sum_k min(g_h, g_r) g_r / (|g_h| |g_r|) times exp(-(l_h - l_r)^2 /
    2 sigma^2), averaged over n and references, times 10, averaged over MRs."""
    toks = [(coco_tokens(h), [coco_tokens(r) for r in rs]) for h, rs in zip(hyps, refs)]
    df = Counter(g for _, rs in toks for g in {g for r in rs for n in range(1, max_n + 1) for g in ngrams(r, n)})
    log_n = math.log(len(toks))

    def vectors(words):
        vec = [{g: c * (log_n - math.log(max(1, df[g]))) for g, c in ngrams(words, n).items()}
               for n in range(1, max_n + 1)]
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]

    scores = []
    for h, rs in toks:
        vh, nh = vectors(h)
        total = 0.0
        for r in rs:
            vr, nr = vectors(r)
            penalty = math.exp(-(len(h) - len(r)) ** 2 / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                total += penalty * dot / (nh[n] * nr[n]) / max_n if nh[n] and nr[n] else 0.0
        scores.append(10 * total / len(rs))
    return sum(scores) / len(scores)


def e2e_metrics(hyps, refs) -> dict:
    return {"BLEU": bleu(hyps, refs), "BLEU_lc": bleu(hyps, refs, lowercase=True), "NIST": nist(hyps, refs),
            "ROUGE_L": rouge_l(hyps, refs), "CIDEr": cider(hyps, refs)}
