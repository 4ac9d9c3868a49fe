"""QM9: parsing qm9pack's tables, the cache, graphs, standardised targets, MPNN, the CLI run.

Most tests read the first rows of the real tables (fast); the tests marked ``slow`` need every
molecule, parsed once into the default cache (about a minute and a half the first time).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import polytask.data.qm9 as q
from helpers import cli
from polytask.data import DATASETS
from polytask.data.graphs import collate_graphs
from polytask.data.loading import iterate_batches
from polytask.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[3]
HAS_QM9PACK = importlib.util.find_spec("qm9pack") is not None
HAS_GEOMETRIC = importlib.util.find_spec("torch_geometric") is not None
needs_qm9pack = pytest.mark.skipif(not HAS_QM9PACK, reason="qm9pack is not installed")
needs_geometric = pytest.mark.skipif(not HAS_GEOMETRIC, reason="torch_geometric is not installed")

# Rows 1, 3, 4 of qm9_part1.csv: methane, water, acetylene (coordinates written with `0.`).
METHANE_XYZ = [
    [-0.0126981359, 1.0858041578, 0.0080009958],
    [0.002150416, -0.0060313176, 0.0019761204],
    [1.0117308433, 1.4637511618, 0.0002765748],
    [-0.540815069, 1.4475266138, -0.8766437152],
    [-0.5238136345, 1.4379326443, 0.9063972942],
]
METHANE_RAW = [0.0, 13.21, -0.3877, 0.1171, 35.3641, 0.044749]
METHANE_ENERGIES = [-40.47893, -40.476062, -40.475117, -40.498597]
METHANE_CV = 6.469


@pytest.fixture(scope="module")
def head_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The header and the first 4 molecules of the real qm9_part1.csv."""
    if not HAS_QM9PACK:
        pytest.skip("qm9pack is not installed")
    lines = []
    with q.source_files()[0].open(encoding="utf-8") as handle:
        for _ in range(5):
            lines.append(handle.readline())
    path = tmp_path_factory.mktemp("qm9") / "head.csv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def head(head_csv: Path) -> q.QM9Source:
    return q.parse_source([head_csv])


def test_parse_pins_methane_water_and_a_zero_literal_row(head: q.QM9Source) -> None:
    assert head.index.tolist() == [1, 2, 3, 4]
    assert np.diff(head.offsets).tolist() == [5, 4, 3, 4]
    assert head.z[:5].tolist() == [6, 1, 1, 1, 1]
    assert head.z[9:12].tolist() == [8, 1, 1]  # water
    np.testing.assert_array_equal(head.pos[:5], np.array(METHANE_XYZ))
    np.testing.assert_array_equal(head.raw[0], METHANE_RAW + METHANE_ENERGIES + [METHANE_CV])
    acetylene = head.pos[12:16]
    np.testing.assert_array_equal(acetylene[:, 1:], np.tile([0.0, 1.0], (4, 1)))
    assert acetylene[0, 0] == 0.5995394918


def test_targets_in_reported_units(head: q.QM9Source) -> None:
    """HOMO, LUMO, ZPVE in meV; U0, U, H, G atomization energies in meV; others as is."""
    targets = head.targets()[0]
    names = list(q.TARGETS)
    mev = 27.211386246 * 1000
    assert targets[names.index("mu")] == 0.0
    assert targets[names.index("homo")] == pytest.approx(-0.3877 * mev, rel=1e-12)
    assert targets[names.index("zpve")] == pytest.approx(0.044749 * mev, rel=1e-12)
    for name, energy in zip(("U0", "U", "H", "G"), METHANE_ENERGIES, strict=True):
        ref = q.ATOM_REFERENCE[name]
        atoms = ref[1] + 4 * ref[0]  # one carbon, four hydrogens
        assert targets[names.index(name)] == pytest.approx((energy - atoms) * mev, rel=1e-12)
    # the methane atomization energy at 0 K is about -17.17 eV
    assert targets[names.index("U0")] == pytest.approx(-17172.2, abs=0.1)
    assert targets[names.index("Cv")] == METHANE_CV


@needs_geometric
def test_atom_reference_matches_torch_geometric() -> None:
    from torch_geometric.datasets.qm9 import atomrefs

    for row, name in zip((7, 8, 9, 10), ("U0", "U", "H", "G"), strict=True):
        ours = np.asarray(q.ATOM_REFERENCE[name]) * 27.211386246
        np.testing.assert_allclose(ours, atomrefs[row], rtol=1e-6)


def _dataset(source: q.QM9Source) -> q.QM9Dataset:
    values = {name: source.targets()[:, j] for j, name in enumerate(q.TARGETS)}
    return q.QM9Dataset(source, np.arange(len(source.index)), values)


def test_methane_is_a_complete_graph_with_distances(head: q.QM9Source) -> None:
    sample = _dataset(head)[0]
    graph = sample["input"]
    assert graph["x"].shape == (5, 6)
    assert graph["x"][:, :5].argmax(1).tolist() == [1, 0, 0, 0, 0]  # C, H, H, H, H
    assert graph["x"][:, 5].tolist() == [6.0, 1.0, 1.0, 1.0, 1.0]
    edges = graph["edge_index"]
    assert edges.shape == (2, 20)
    pairs = set(map(tuple, edges.t().tolist()))
    assert pairs == {(i, j) for i in range(5) for j in range(5) if i != j}
    xyz = np.array(METHANE_XYZ)
    expected = [np.linalg.norm(xyz[i] - xyz[j]) for i, j in edges.t().tolist()]
    np.testing.assert_allclose(graph["edge_attr"][:, 0].numpy(), expected, rtol=1e-6)
    assert sample["targets"]["U0"].dtype == torch.float64
    assert sample["targets"]["Cv"].tolist() == [METHANE_CV]
    water = _dataset(head)[2]["input"]
    assert water["x"].shape == (3, 6) and water["edge_index"].shape == (2, 6)


def test_standardisation_is_inverted_exactly_in_the_reported_mae() -> None:
    mean, std = -6536.45, 597.74
    task = q._make_task("homo", mean, std)
    pred = torch.tensor([[0.5], [-1.25], [2.0]])  # the network's standardised outputs
    target = torch.tensor([[-6300.0], [-7300.5], [-5100.0]], dtype=torch.float64)
    metric = task.make_metrics()["mae"]
    metric.update(task.prepare(pred), target)
    p = pred.double().numpy()[:, 0]
    y = target.numpy()[:, 0]
    assert metric.compute() == {"mae": float(np.mean(np.abs(p * std + mean - y)))}
    loss = task.compute_loss(pred, target)
    hand = np.mean((p - (y - mean) / std) ** 2)
    assert float(loss) == pytest.approx(hand, rel=1e-6)
    assert task.higher_is_better() == {"mae": False}


def _small_source_constants(
    monkeypatch: pytest.MonkeyPatch, head_csv: Path, head: q.QM9Source
) -> list[int]:
    """Point the loader at the 4-molecule table; count the parses."""
    monkeypatch.setattr(q, "source_files", lambda: [head_csv])
    monkeypatch.setattr(q, "NUM_MOLECULES", 4)
    monkeypatch.setattr(q, "NUM_ATOMS", len(head.z))
    monkeypatch.setattr(q, "SOURCE_SHA256", q._digest(head))
    parses = [0]
    parse = q.parse_source

    def counting(paths: Any) -> q.QM9Source:
        parses[0] += 1
        return parse(paths)

    monkeypatch.setattr(q, "parse_source", counting)
    return parses


def test_cache_is_reused_and_a_corrupt_one_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, head_csv: Path, head: q.QM9Source
) -> None:
    parses = _small_source_constants(monkeypatch, head_csv, head)
    first = q.load_source(tmp_path)
    (cache,) = tmp_path.glob("qm9-*.npz")
    assert parses == [1]
    second = q.load_source(tmp_path)
    assert parses == [1]
    assert q._digest(second) == q._digest(first) == q._digest(head)
    cache.write_bytes(b"not a zip file")
    assert q._digest(q.load_source(tmp_path)) == q._digest(head)
    assert parses == [2]
    # a readable cache whose content was altered is not trusted either
    altered = q.QM9Source(head.index, head.offsets, head.z, head.pos + 1.0, head.raw)
    q._write_cache(altered, cache)
    assert q._digest(q.load_source(tmp_path)) == q._digest(head)
    assert parses == [3]
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temporary file left


def test_source_that_does_not_verify_is_a_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, head_csv: Path, head: q.QM9Source
) -> None:
    _small_source_constants(monkeypatch, head_csv, head)
    monkeypatch.setattr(q, "SOURCE_SHA256", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        q.load_source(tmp_path)
    monkeypatch.setattr(q, "NUM_MOLECULES", 130_831)
    with pytest.raises(DataError, match="130831 molecules"):
        q.load_source(tmp_path)


def test_missing_package_or_table_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec

    def no_qm9pack(name: str, *args: Any) -> Any:
        return None if name == "qm9pack" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_qm9pack)
    with pytest.raises(DataError, match=r"pip install 'polytask\[data\]'"):
        q.qm9(subset=100, cache_dir=str(tmp_path))
    monkeypatch.setattr(q, "_package_dir", lambda: tmp_path)
    with pytest.raises(DataError, match=r"qm9_part1\.csv.*missing.*force-reinstall"):
        q.source_files()


def test_bad_columns_are_a_data_error(head_csv: Path, tmp_path: Path) -> None:
    text = head_csv.read_text(encoding="utf-8").replace("XYZ_Ang", "XYZ", 1)
    broken = tmp_path / "broken.csv"
    broken.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"column.*XYZ_Ang"):
        q.parse_source([broken])


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"subset": -1}, "`subset`"),
        ({"subset": 200_000}, "at most 130831"),
        ({"n_val": 1.5}, "`n_val`"),
        ({"subset": 10, "n_val": 5, "n_test": 4}, "leave 1 of 10"),
        ({"targets": ["U0", "u"]}, "unknown target 'u'"),
        ({"targets": "U0"}, "`targets`"),
    ],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        q.qm9(**options)


# -- the sample contract: a data set's own collate ---------------------------------------


class ToyGraphs(torch.utils.data.Dataset[dict[str, Any]]):
    """Graph i is a path of i + 1 nodes; its target is its number of nodes."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = i + 1
        edges = torch.tensor([list(range(n - 1)), list(range(1, n))], dtype=torch.int64)
        return {
            "input": {
                "x": torch.full((n, 2), float(i)),
                "edge_index": edges,
                "edge_attr": torch.ones(n - 1, 1),
            },
            "targets": {"size": torch.tensor([float(n)])},
        }

    def collate(self, samples: Any) -> dict[str, Any]:
        return collate_graphs(samples)


def test_iterate_batches_uses_the_data_sets_collate() -> None:
    steps = [{"j": [3, 1]}, {"j": [0, 2]}]
    batches = [b["j"] for b in iterate_batches({"j": ToyGraphs()}, steps)]
    first = batches[0]["input"]
    assert first["num_graphs"] == 2
    assert first["batch"].tolist() == [0, 0, 0, 0, 1, 1]
    assert first["x"][:, 0].tolist() == [3, 3, 3, 3, 1, 1]
    # graph 1 (two nodes) follows the four nodes of graph 3: its edge is shifted by 4
    assert first["edge_index"].tolist() == [[0, 1, 2, 4], [1, 2, 3, 5]]
    assert batches[0]["targets"]["size"].tolist() == [[4.0], [2.0]]
    assert batches[1]["input"]["edge_index"].tolist() == [[1, 2], [2, 3]]


def test_collate_rejects_a_non_graph_input() -> None:
    with pytest.raises(DataError, match="x, edge_index, edge_attr"):
        collate_graphs([{"input": torch.zeros(3), "targets": {}}])


# -- the MPNN backbone ----------------------------------------------------------------------


@needs_geometric
def test_mpnn_gives_one_vector_per_molecule_invariant_to_atom_order(head: q.QM9Source) -> None:
    from polytask.models.backbones.mpnn import MPNN

    torch.manual_seed(0)
    net = MPNN(input_shape=(6,), width=16, edge_hidden=32).eval()
    data = _dataset(head)
    methane, water = data[0], data[2]
    out = net(collate_graphs([methane, water])["input"])
    assert out.shape == (2, net.out_features) == (2, 16)
    # renumber methane's atoms: same molecule, same features
    perm = torch.tensor([3, 0, 4, 2, 1])
    inverse = torch.argsort(perm)
    graph = methane["input"]
    permuted = {
        "input": {
            "x": graph["x"][perm],
            "edge_index": inverse[graph["edge_index"]],
            "edge_attr": graph["edge_attr"],
        },
        "targets": methane["targets"],
    }
    again = net(collate_graphs([water, permuted])["input"])
    torch.testing.assert_close(again[1], out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again[0], out[1], rtol=1e-5, atol=1e-6)
    alone = net(collate_graphs([methane])["input"])
    torch.testing.assert_close(alone[0], out[0], rtol=1e-5, atol=1e-6)


def test_mpnn_without_torch_geometric_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from polytask.models.backbones.mpnn import MPNN

    monkeypatch.setitem(sys.modules, "torch_geometric.nn", None)
    with pytest.raises(ConfigError, match=r"polytask\[graph\]"):
        MPNN(input_shape=(6,))


def test_mpnn_rejects_non_graph_shapes() -> None:
    from polytask.models.backbones.mpnn import MPNN

    with pytest.raises(ConfigError, match=r"\(node_features,\)"):
        MPNN(input_shape=(3, 32, 32))


# -- every molecule (the default cache) ------------------------------------------------------


@pytest.mark.slow
@needs_qm9pack
def test_bundle_splits_and_train_statistics() -> None:
    bundle = DATASETS.get("qm9")(subset=300, n_val=0.1, n_test=50, seed=3)
    assert bundle.info["sizes"] == {"val": 30, "test": 50, "train": 220}
    assert list(bundle.tasks) == list(q.TARGETS)
    splits = [set(bundle.split(s).molecules.tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, splits)) == len(set.union(*splits)) == 300
    train = np.array(
        [[float(bundle.train[i]["targets"][t]) for t in q.TARGETS] for i in range(220)]
    )
    for j, name in enumerate(q.TARGETS):
        assert bundle.info["target_mean"][name] == pytest.approx(train[:, j].mean(), rel=1e-12)
        assert bundle.info["target_std"][name] == pytest.approx(
            math.sqrt(np.var(train[:, j], ddof=1)), rel=1e-12
        )
    again = DATASETS.get("qm9")(subset=300, n_val=0.1, n_test=50, seed=3, targets=["G", "mu"])
    assert list(again.tasks) == ["mu", "G"]
    np.testing.assert_array_equal(again.test.molecules, bundle.test.molecules)
    assert bundle.train.index.min() >= 1 and bundle.train.index.max() <= 133_885


@pytest.mark.slow
@needs_qm9pack
@needs_geometric
def test_cli_trains_the_cpu_recipe(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(
        capsys,
        "train",
        ROOT / "configs/qm9/qm9-subset-cpu.yaml",
        "train.epochs=1",
        "data.options.subset=100",
        f"output_dir={tmp_path}",
    )
    assert code == 0, err
    # eleven tasks: a summary, then the per-task values one row per task and metric
    assert "mean mae over 11 tasks" in out
    assert re.search(r"^\| U0 +\| mae ↓ +\| [0-9.]+", out, re.MULTILINE), out
    assert "inspection of the model failed" not in out + err
