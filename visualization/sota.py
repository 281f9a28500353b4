"""ImageNet top-1 accuracy against OPs for BNext and the binary networks it is compared with.

``python -m visualization.sota --out visualization/sota.png [--markdown]``

Every accuracy and every published OPs value below is copied from the project's
source notes (``shared/spec/PEERS.md`` §C and ``shared/spec/BNEXT_SPEC.md`` §1.7/§4),
which name the publication each comes from; nothing is estimated. A model whose
accuracy or OPs is not in those notes is listed as "not found" and left off the plot.

OPs of the BNext family are computed by this project (:func:`models.summary.summarize_by_name`,
224x224 ImageNet input) in both conventions:

* standard (ReActNet): ``OPs = BOPs/64 + FLOPs``, the convention of the peers' published
  OPs, so this is the like-for-like comparison;
* the BNext README's: ``OPs = BOPs/64 + FLOPs/8`` (real-valued layers counted as 8-bit),
  which reproduces the README's published "BOPs (G)" column.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from matplotlib.figure import Figure

from models.summary import summarize_by_name

NOT_FOUND = "not found"
#: Where the peers' numbers were read; each row names the publication behind it.
_REACTNET_README = "ReActNet README (liuzechun/ReActNet; Liu et al., ECCV 2020)"
_BNEXT_README = "BNext README (hpi-xnor/BNext; Guo et al., arXiv 2211.12933)"


@dataclass(frozen=True)
class Result:
    """A published ImageNet result: top-1 and OPs, each with its source (None where not found)."""

    model: str
    method: str  # the paper that introduced the network
    top1: float | None
    top1_source: str
    ops_g: float | None  # published OPs in 10^9, standard convention BOPs/64 + FLOPs
    ops_source: str
    note: str = ""


#: Peers, in the order of the plot's legend. Values: PEERS.md §C and BNEXT_SPEC.md §1.7.
PEERS: tuple[Result, ...] = (
    Result("XNOR-Net", "Rastegari et al., ECCV 2016", 51.2, _REACTNET_README, 0.167, _REACTNET_README),
    Result("Bi-Real Net-18", "Liu et al., ECCV 2018", 56.4, _REACTNET_README, 0.163, _REACTNET_README),
    Result("Bi-Real Net-34", "Liu et al., ECCV 2018", None, NOT_FOUND, None, NOT_FOUND),
    Result("Real-to-Binary", "Martinez et al., ICLR 2020", 65.4, _REACTNET_README, 0.183, _REACTNET_README),
    Result("ReActNet (Bi-Real-18 based)", "Liu et al., ECCV 2020", 65.9, _REACTNET_README, 0.163, _REACTNET_README),
    Result(
        "ReActNet-A",
        "Liu et al., ECCV 2020",
        69.4,
        "ReActNet paper (Liu et al., ECCV 2020); its README table gives 69.5",
        0.087,
        _REACTNET_README,
    ),
    Result("ReActNet-B", "Liu et al., ECCV 2020", None, NOT_FOUND, None, NOT_FOUND),
    Result(
        "ReActNet-C",
        "Liu et al., ECCV 2020",
        71.4,
        "summary of the ReActNet paper (blueardour.github.io/2020/07/01/ReActNet.html)",
        None,
        NOT_FOUND,
    ),
    Result(
        "MeliusNet-18",
        "Bethge et al., 2020",
        None,
        NOT_FOUND,
        None,
        NOT_FOUND,
        "only its binarization degree (16.76 %) is in the BNext README",
    ),
    Result(
        "PokeBNN (small)",
        "Zhang et al., CVPR 2022",
        70.5,
        "PokeBNN abstract (arXiv 2112.00133)",
        None,
        NOT_FOUND,
        "cost published as 2.6 ACE, not OPs",
    ),
    Result(
        "PokeBNN (large)",
        "Zhang et al., CVPR 2022",
        75.6,
        "PokeBNN abstract (arXiv 2112.00133)",
        None,
        NOT_FOUND,
        "cost published as 7.8 ACE, not OPs",
    ),
)

#: BNext: published top-1 and the README's published OPs ("BOPs (G)" column, README convention).
BNEXT: tuple[tuple[str, str, float | None, str, float | None], ...] = (
    ("BNext-T", "bnext_tiny", 72.4, _BNEXT_README, 0.077),
    ("BNext-S", "bnext_small", 76.1, _BNEXT_README, 0.172),
    ("BNext-M", "bnext_middle", 78.3, _BNEXT_README, 0.317),
    (
        "BNext-L",
        "bnext_large",
        80.57,
        "BNext paper abstracts (Guo et al., TMLR 2023; arXiv 2211.12933); README rounds to 80.6",
        0.819,
    ),
    ("BNext-18", "bnext18", None, NOT_FOUND, None),
)


@dataclass(frozen=True)
class BNextRow:
    """A BNext model: published top-1, published README OPs, and the OPs computed by this project."""

    model: str
    factory_name: str
    top1: float | None
    top1_source: str
    published_ops_readme_g: float | None
    ops_g: float  # computed, BOPs/64 + FLOPs
    ops_readme_g: float  # computed, BOPs/64 + FLOPs/8


@lru_cache(maxsize=4)
def bnext_rows(img_size: int = 224) -> tuple[BNextRow, ...]:
    """The BNext family with OPs computed by :func:`models.summary.summarize_by_name` at ``img_size``."""
    rows = []
    for model, factory_name, top1, source, published in BNEXT:
        summary = summarize_by_name(factory_name, img_size=img_size)
        rows.append(BNextRow(model, factory_name, top1, source, published, summary.ops / 1e9, summary.ops_readme / 1e9))
    return tuple(rows)


def _fmt(value: float | None, digits: int) -> str:
    return NOT_FOUND if value is None else f"{value:.{digits}f}"


def _fmt_top1(value: float | None) -> str:
    # As published: 80.57 keeps two decimals, 72.4 one.
    return NOT_FOUND if value is None else f"{value:g}"


def markdown_table(rows: Sequence[BNextRow] | None = None) -> str:
    """The README table: model, top-1, OPs (G), OPs source, accuracy source (BNext first, then the peers)."""
    rows = bnext_rows() if rows is None else rows
    lines = [
        "| model | top-1 (%) | OPs (G) | OPs source | accuracy source |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        published = (
            f"; README publishes {row.published_ops_readme_g:.3f}" if row.published_ops_readme_g is not None else ""
        )
        lines.append(
            f"| {row.model} | {_fmt_top1(row.top1)} "
            f"| {row.ops_g:.4f} / {row.ops_readme_g:.4f} "
            f"| computed by this project (models.summary, 224x224): BOPs/64 + FLOPs / BOPs/64 + FLOPs/8{published} "
            f"| {row.top1_source} |"
        )
    for peer in PEERS:
        note = f" ({peer.note})" if peer.note else ""
        lines.append(
            f"| {peer.model} ({peer.method}) | {_fmt_top1(peer.top1)} | {_fmt(peer.ops_g, 3)} "
            f"| {peer.ops_source}{note} | {peer.top1_source} |"
        )
    return "\n".join(lines)


#: Label offsets (points) where two peers sit close together on the plot.
_LABEL_OFFSETS = {"Real-to-Binary": (7, -11)}


def plot(rows: Sequence[BNextRow], path: str | Path) -> None:
    """Top-1 against OPs (log x): BNext with computed OPs in both conventions, peers with published OPs."""
    fig = Figure(figsize=(9.5, 6.4), layout="constrained")
    ax = fig.add_subplot()
    plotted = [row for row in rows if row.top1 is not None]
    ax.plot(
        [row.ops_g for row in plotted],
        [row.top1 for row in plotted],
        "-*",
        color="C3",
        markersize=13,
        label="BNext, OPs = BOPs/64 + FLOPs (computed here)",
    )
    ax.plot(
        [row.ops_readme_g for row in plotted],
        [row.top1 for row in plotted],
        "--*",
        color="C3",
        markerfacecolor="white",
        markersize=11,
        alpha=0.8,
        label="BNext, OPs = BOPs/64 + FLOPs/8, README convention (computed here)",
    )
    published = [row for row in plotted if row.published_ops_readme_g is not None]
    ax.plot(
        [row.published_ops_readme_g for row in published],
        [row.top1 for row in published],
        "x",
        color="black",
        markersize=7,
        label="BNext, OPs published in its README",
    )
    for row in plotted:
        ax.annotate(row.model, (row.ops_g, row.top1), xytext=(8, -4), textcoords="offset points", fontsize=9)
    peers = [peer for peer in PEERS if peer.top1 is not None and peer.ops_g is not None]
    ax.plot(
        [peer.ops_g for peer in peers],
        [peer.top1 for peer in peers],
        "o",
        color="C0",
        markersize=7,
        label="other binary networks (published top-1 and OPs)",
    )
    for peer in peers:
        offset = _LABEL_OFFSETS.get(peer.model, (7, -3))
        ax.annotate(peer.model, (peer.ops_g, peer.top1), xytext=offset, textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(0.06, 1.3)
    ax.set_xticks([0.07, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0], labels=["0.07", "0.1", "0.2", "0.3", "0.5", "0.8", "1.0"])
    ax.set_xlabel("OPs (10^9, log scale): BOPs/64 + FLOPs unless marked")
    ax.set_ylabel("ImageNet top-1 (%)")
    ax.set_title("Binary networks on ImageNet: top-1 vs OPs", fontsize=12)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    left_out = [
        f"{peer.model} ({_fmt_top1(peer.top1)}%: {peer.note or 'OPs ' + NOT_FOUND})"
        if peer.top1 is not None
        else f"{peer.model} (top-1 {NOT_FOUND})"
        for peer in PEERS
        if peer.top1 is None or peer.ops_g is None
    ]
    left_out += [f"{row.model} (top-1 {NOT_FOUND})" for row in rows if row.top1 is None]
    fig.text(
        0.01,
        0.005,
        "Not plotted: " + "; ".join(left_out) + ".\nSources: see python -m visualization.sota --markdown.",
        fontsize=6.5,
        wrap=True,
        va="bottom",
    )
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    fig.savefig(path, dpi=100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m visualization.sota",
        description="ImageNet top-1 vs OPs of BNext and other binary networks, with sources.",
    )
    parser.add_argument("--out", default="visualization/sota.png", help="PNG to write (default visualization/sota.png)")
    parser.add_argument("--markdown", action="store_true", help="also print the README table with sources")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write the plot, print the table with ``--markdown``; returns 0."""
    args = _parser().parse_args(argv)
    rows = bnext_rows()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out)
    if args.markdown:
        print(markdown_table(rows))
    print(out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
