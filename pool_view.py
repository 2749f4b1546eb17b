"""The unified pool, drawn: every page coloured by its owner (S-LoRA, arXiv 2311.03285, Figure 3).

S-LoRA's Figure 3 shows one memory pool whose pages hold, side by side, the KV cache of running
requests and the weights of the adapters they use, with free pages between them. This file draws
that picture from a live pool (paging.UnifiedPool): one square per page, P squares in rows of
`columns`, page p at row p // columns, column p % columns; a request's K and V pages share its
colour, an adapter's pages (every target, A and B^T rows) share another, free pages are grey.
Each square's tooltip names its owner. `svg` returns the picture; `html` the server's GET /pool
page around it: the picture, the counters of /metrics and, per adapter name, where its weights
are (pool pages, host memory or only its files on disk) and how many requests use it. The page
reloads itself every second (a meta refresh: no JavaScript).
Simplified: a square stands for a page in every layer at once (allocating page p reserves it in
all L layers, paging.py); the page is rebuilt whole at each refresh.
Demo: `python paging.py --picture pool.svg` (the demo's pool after its last step; write_picture).
Letters: P pages.
"""
import html as html_lib
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

FREE = "#e4e4e4"
KV_COLOURS = ("#1f77b4", "#4a90d9", "#17becf", "#2c5d8f", "#6baed6", "#08519c")
ADAPTER_COLOURS = ("#ff7f0e", "#d62728", "#e377c2", "#bcbd22", "#8c564b", "#f4a582")


def page_owners(pool) -> List[Optional[Tuple[str, str]]]:
    """Per page: ("request", id) for KV pages, ("adapter", pool key) for adapter pages, None."""
    owners: List[Optional[Tuple[str, str]]] = [None] * pool.cfg.n_pages
    for seq, blocks in pool.blocks.items():
        for k_page, v_page in blocks:
            owners[k_page] = owners[v_page] = ("request", str(seq))
    for name, res in pool.resident.items():
        for p in res.taken:
            owners[p] = ("adapter", name)
    return owners


def colour(owner: Optional[Tuple[str, str]], order: Dict[Tuple[str, str], int]) -> str:
    """Grey for free; else the owner's colour, by its order of first appearance."""
    if owner is None:
        return FREE
    palette = KV_COLOURS if owner[0] == "request" else ADAPTER_COLOURS
    return palette[order[owner] % len(palette)]


def svg(owners: List[Optional[Tuple[str, str]]], columns: int = 64, cell: int = 10,
        title: str = "") -> str:
    """The pool (page_owners) as an SVG picture: a square per page, a legend of owners and their
    page counts."""
    order: Dict[Tuple[str, str], int] = {}
    counts: Dict[Tuple[str, str], int] = {}
    for o in owners:
        if o is not None:
            order.setdefault(o, sum(1 for k in order if k[0] == o[0]))
            counts[o] = counts.get(o, 0) + 1
    rows = -(-len(owners) // columns)
    legend = [("free", FREE, owners.count(None))] + [
        (f"{kind} {who}", colour((kind, who), order), n) for (kind, who), n in counts.items()]
    heading = (f"{title or 'unified pool'}: {len(owners)} pages, KV cache and adapter weights "
               f"in one pool")
    width, top = max(columns * cell, 7 * len(heading)), 24
    height = top + rows * cell + 8 + 16 * len(legend)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="0" y="14">{html_lib.escape(heading)}</text>']
    for p, o in enumerate(owners):
        x, y = p % columns * cell, top + p // columns * cell
        who = "free" if o is None else f"{o[0]} {o[1]}"
        out.append(f'<rect class="page" data-owner="{html_lib.escape(who)}" x="{x}" y="{y}" '
                   f'width="{cell - 1}" height="{cell - 1}" fill="{colour(o, order)}">'
                   f'<title>page {p}: {html_lib.escape(who)}</title></rect>')
    y = top + rows * cell + 8
    for i, (label, fill, n) in enumerate(legend):
        out.append(f'<rect x="0" y="{y + 16 * i}" width="10" height="10" fill="{fill}"/>'
                   f'<text x="16" y="{y + 16 * i + 9}">{html_lib.escape(label)}: {n} pages</text>')
    return "\n".join(out + ["</svg>"])


def write_picture(pool, path: str, title: str):
    """The picture to `path` and, beside it (.json), each page's owner and the pool's counts."""
    owners = page_owners(pool)
    with open(path, "w") as f:
        f.write(svg(owners, columns=16, cell=18, title=title))
    owners = [None if o is None else f"{o[0]} {o[1]}" for o in owners]
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"pages": pool.cfg.n_pages, "owners": owners, **asdict(pool.stats())}, f,
                  indent=1)
    print(f"wrote {path} and its numbers beside it")


def html(owners: list, where: Dict[str, tuple], metrics: Dict[str, tuple]) -> str:
    """GET /pool: the picture of page_owners' list, /metrics' counters, and each adapter's tier
    and users."""
    rows = "".join(f"<tr><td>{html_lib.escape(name)}</td><td>{tier}</td><td>{users}</td>"
                   f"<td>{pages}</td></tr>" for name, (tier, users, pages) in sorted(where.items()))
    counters = "".join(f"<tr><td>slora_{name}</td><td>{value}</td>"
                       f"<td>{html_lib.escape(help)}</td></tr>"
                       for name, (help, value) in metrics.items())
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" "
            "content=\"1\"><title>S-LoRA unified pool</title><style>body{font-family:sans-serif}"
            "td,th{padding:2px 8px;text-align:left}</style></head><body>"
            f"<h1>Unified pool</h1>{svg(owners, columns=100, cell=8)}"
            "<h2>Adapters</h2><table id=\"adapters\"><tr><th>name</th><th>weights in</th>"
            f"<th>requests using it</th><th>pool pages</th></tr>{rows}</table>"
            f"<h2>Counters</h2><table id=\"counters\">{counters}</table></body></html>")
