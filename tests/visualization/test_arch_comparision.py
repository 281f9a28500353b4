"""ArchComparision.py and the peer block designs: graphs read back from TensorBoard's event files.

Each design's graph is written by the script's ``main`` into ``tmp_path`` and read
back with TensorBoard's own event reader; the assertions name the operations the
design's paper prescribes. Binarizers are custom autograd Functions, which the
tracer records as ``prim::PythonOp`` nodes whose ``attr`` holds their traced
subgraph; the ops inside (``aten::sign`` ...) are counted apart.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models.layers import BinaryConv2d
from models.precision import layer_precision
from visualization.block_designs import DESIGNS, ApproxSign, build_block

REPO_ROOT = Path(__file__).resolve().parents[2]
PRECOMPUTED = REPO_ROOT / "visualization" / "runs"
EVENT_GLOB = "events.out.tfevents.*"
#: Small shapes keep the traces fast; 16 channels leave the ratio-8 gates 2 hidden units.
CHANNELS = 16
IMG = 8


def load_script() -> ModuleType:
    """Import ArchComparision.py from the repository root as a module."""
    spec = importlib.util.spec_from_file_location("ArchComparision", REPO_ROOT / "ArchComparision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARCH = load_script()


@dataclass(frozen=True)
class Graph:
    """What the tests look at in a GraphDef."""

    nodes: list[tuple[str, str]]  # (name, op); the names carry the module scopes
    inner: Counter[str]  # aten ops inside the prim::PythonOp subgraphs

    def count(self, op: str) -> int:
        """Nodes of ``op``, e.g. ``aten::_convolution``."""
        return sum(1 for _, node_op in self.nodes if node_op == op)

    def binary_convs(self) -> int:
        """Convolutions traced inside a (Scaled)BinaryConv2d scope."""
        return sum(1 for name, op in self.nodes if op == "aten::_convolution" and "BinaryConv2d[" in name)

    def in_scope(self, scope: str) -> bool:
        """Whether some node lies inside a module scope such as ``ELMAttention[Attention]``."""
        return any(scope in name for name, _ in self.nodes)


def read_graph(run_dir: Path) -> Graph:
    """The GraphDef of the event file in ``run_dir``."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"graph": 0})
    accumulator.Reload()
    inner: Counter[str] = Counter()
    nodes = []
    for node in accumulator.Graph().node:
        nodes.append((node.name, node.op))
        if node.op == "prim::PythonOp":
            inner.update(re.findall(r"aten::\w+", node.attr["attr"].s.decode()))
    return Graph(nodes, inner)


def write_and_read(tmp_path: Path, arc: str, out_planes: int, capsys: pytest.CaptureFixture[str]) -> Graph:
    argv = ["--arc", arc, "--inplanes", str(CHANNELS), "--out_planes", str(out_planes)]
    argv += ["--img-size", str(IMG), "--logdir", str(tmp_path)]
    assert ARCH.main(argv) == 0
    run_dir = tmp_path / f"{arc}_{CHANNELS}_{out_planes}"
    assert len(list(run_dir.glob(EVENT_GLOB))) == 1
    printed = capsys.readouterr().out
    assert str(run_dir) in printed and f"tensorboard --logdir {tmp_path}" in printed
    return read_graph(run_dir)


def check_design(arc: str, g: Graph, doubling: bool) -> None:
    """The operations each design must (and must not) have."""
    # Every design binarizes activations (sign in a PythonOp) and convolves.
    assert g.inner["aten::sign"] >= 1 and g.count("prim::PythonOp") >= 2
    assert g.binary_convs() >= 1
    if arc.startswith("BNext"):
        # Downsampling blocks have a 2x2 average-pool shortcut, which BNext computes from four
        # strided slices inside a PythonOp (models.layers.avg_pool_2x2); keep-shape blocks have none.
        assert (g.inner["aten::slice"] >= 4) == doubling
    elif arc != "XNOR":  # XNOR-Net pools with max and box-filters K with avg_pool2d; see below
        # Downsampling blocks have an AvgPool shortcut; keep-shape blocks pool only in the SE's GAP.
        assert (g.count("aten::avg_pool2d") >= 1) == doubling
    if arc.startswith("BNext"):
        elm = "noELM" not in arc
        recoupling = "noIR" not in arc
        processors = 3 if doubling else 2  # the 3x3 module and one or two 1x1 FFNs
        assert g.binary_convs() == processors
        assert g.count("aten::batch_norm") >= processors
        assert (g.count("aten::cat") == 1) == doubling
        # Info-recoupling: a sigmoid SE gate per processor fed by the gamma mix (rsub) of the
        # spatial means of the real input and the binary branch (two means per processor).
        assert g.count("aten::sigmoid") == (processors if recoupling else 0)
        assert g.count("aten::mean") == (2 * processors if recoupling else 0)
        assert (g.count("aten::rsub") > 0) == recoupling
        # ELM-attention: the spatial module is the Attention class, with the b * r product.
        assert g.in_scope("ELMAttention[Attention]") == elm
        assert g.in_scope("BinaryFFN[FFN_3x3]") == (not elm)
        if not recoupling:
            assert g.count("aten::mul") == (1 if elm else 0)
    elif arc == "XNOR":
        assert g.binary_convs() == 1 and g.count("aten::_convolution") == 1
        # alpha = mean|W| and K = box-filtered channel mean of |I|.
        assert g.count("aten::abs") >= 2 and g.count("aten::mean") >= 2
        assert g.count("aten::mul") >= 2  # alpha * sign(W), output * K
        assert g.count("aten::batch_norm") == 1
        assert g.count("aten::add") == 0, "XNOR-Net has no shortcut"
        assert g.count("aten::avg_pool2d") == 1  # the box filter of K
        assert (g.count("aten::max_pool2d") == 1) == doubling  # the block's Pool carries the stride
    elif arc == "BiReal":
        assert g.binary_convs() == 2
        # One real shortcut add per binary conv.
        assert g.count("aten::add") == g.binary_convs()
        assert g.in_scope("ApproxSign[")
        assert g.count("aten::abs") == 2 and g.count("aten::mean") == 2  # magnitude-aware weights
        assert g.count("aten::prelu") == 0 and g.count("aten::sigmoid") == 0
        # Downsampling shortcut: AvgPool + real 1x1 conv + BN.
        assert g.count("aten::_convolution") == 2 + (1 if doubling else 0)
        assert g.count("aten::batch_norm") == 2 + (1 if doubling else 0)
    elif arc == "Real2Binary":
        assert g.binary_convs() == 2
        # One data-driven gate (two 1x1 convs, sigmoid) per binary conv, multiplied on its output.
        assert g.count("aten::sigmoid") == 2 and g.count("aten::adaptive_avg_pool2d") == 2
        assert g.count("aten::_convolution") == 2 + 4 + (1 if doubling else 0)
        assert g.count("aten::mul") >= 2 and g.count("aten::prelu") == 2
        assert g.count("aten::add") == 2
    elif arc == "ReActNet":
        units = 3 if doubling else 2
        assert g.binary_convs() == units
        assert g.count("aten::_convolution") == units, "no real-valued conv in the block"
        assert g.count("aten::prelu") == units  # one RPReLU per binary conv
        # Per unit: RSign's threshold, RPReLU's two shifts and the shortcut.
        assert g.count("aten::add") == 4 * units
        assert g.in_scope("RSign[") and g.in_scope("RPReLU[")
        assert (g.count("aten::cat") == 1) == doubling
    else:  # pragma: no cover - a new design needs its own expectations
        pytest.fail(f"no expectations for {arc}")


@pytest.mark.parametrize("arc", list(DESIGNS))
def test_each_design_graph_has_its_operations(arc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = write_and_read(tmp_path, arc, CHANNELS, capsys)
    check_design(arc, graph, doubling=False)


def test_all_writes_every_design_and_doubling_graphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--arc", "all", "--inplanes", str(CHANNELS), "--out_planes", str(2 * CHANNELS)]
    assert ARCH.main([*argv, "--img-size", str(IMG), "--logdir", str(tmp_path)]) == 0
    assert "stride 2" in capsys.readouterr().out  # the default stride of a doubling block
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{a}_{CHANNELS}_{2 * CHANNELS}" for a in DESIGNS)
    for arc in DESIGNS:
        check_design(arc, read_graph(tmp_path / f"{arc}_{CHANNELS}_{2 * CHANNELS}"), doubling=True)


def test_rerun_replaces_the_event_file(tmp_path: Path) -> None:
    argv = ["--arc", "XNOR", "--inplanes", "8", "--out_planes", "8", "--img-size", "4", "--logdir", str(tmp_path)]
    assert ARCH.main(argv) == 0 and ARCH.main(argv) == 0
    assert len(list((tmp_path / "XNOR_8_8").glob(EVENT_GLOB))) == 1


def test_unknown_arc_lists_the_valid_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ARCH.main(["--arc", "NoSuchNet", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "NoSuchNet" in err and all(name in err for name in DESIGNS)
    assert not any(tmp_path.iterdir())


def test_unknown_arc_exits_with_code_2_from_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "ArchComparision.py", "--arc", "NoSuchNet", "--logdir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "ReActNet" in result.stderr and "BNext_noELM_noIR" in result.stderr


def test_unsupported_channel_change_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--arc", "ReActNet", "--inplanes", "16", "--out_planes", "48", "--logdir", str(tmp_path)]
    assert ARCH.main(argv) == 2
    assert "out == in or out == 2*in" in capsys.readouterr().err
    for arc in ("BNext", "BNext_noIR", "ReActNet"):
        with pytest.raises(ValueError, match="keep or double"):
            build_block(arc, 16, 48, 1)
    # The designs with a real 1x1 shortcut (or none) may change the channels freely.
    for arc in ("XNOR", "BiReal", "Real2Binary"):
        assert build_block(arc, 16, 24, 2)(torch.randn(1, 16, 8, 8)).shape == (1, 24, 4, 4)


@pytest.mark.parametrize("arc", list(DESIGNS))
def test_blocks_have_the_right_shape_and_tagged_binary_convs(arc: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, CHANNELS, IMG, IMG, requires_grad=True)
    for out_planes, stride, size in ((CHANNELS, 1, IMG), (2 * CHANNELS, 2, IMG // 2)):
        block = build_block(arc, CHANNELS, out_planes, stride)
        y = block(x)
        assert y.shape == (2, out_planes, size, size)
        y.sum().backward()
        binary = [m for m in block.modules() if isinstance(m, BinaryConv2d)]
        assert binary and all(layer_precision(m).is_binary for m in binary)
        assert all(m.weight.grad is not None for m in binary)


def test_approx_sign_has_the_piecewise_polynomial_gradient() -> None:
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0, 2.0], requires_grad=True)
    y = ApproxSign()(x)
    y.sum().backward()
    assert torch.equal(y, torch.sign(x.detach()))
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 2.0, 1.5, 0.0, 0.0]))


def test_precomputed_runs_hold_one_graph_per_design() -> None:
    if not PRECOMPUTED.is_dir():
        pytest.fail(
            f"{PRECOMPUTED} is missing; regenerate it with "
            "`python ArchComparision.py --arc all --inplanes 64 --out_planes 64 --logdir visualization/runs`"
        )
    for arc in DESIGNS:
        events = list((PRECOMPUTED / f"{arc}_64_64").glob(EVENT_GLOB))
        assert len(events) == 1, f"{arc}_64_64 should hold exactly one event file, found {len(events)}"
    graph = read_graph(PRECOMPUTED / "BNext_64_64")
    check_design("BNext", graph, doubling=False)
    total = sum(p.stat().st_size for p in PRECOMPUTED.rglob("*") if p.is_file())
    assert total < 5 * 2**20, f"visualization/runs is {total} bytes; keep it well under 5 MB"
