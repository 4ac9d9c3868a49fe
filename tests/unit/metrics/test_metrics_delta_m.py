"""Delta_m in both conventions, and Baseline validation and persistence."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from polytask.errors import ConfigError, DataError
from polytask.metrics import (
    DELTA_M_CONVENTIONS,
    Baseline,
    DepthMetric,
    NormalMetric,
    SegmentationMetric,
    delta_m,
    delta_m_higher_is_better,
)

# MTAN paper (CVPR 2019), NYUv2 13-class, REFERENCE.md section 2.
HIGHER = {
    "segmentation": dict(SegmentationMetric(num_classes=13).higher_is_better),
    "depth": dict(DepthMetric().higher_is_better),
    "normals": dict(NormalMetric().higher_is_better),
}
ONE_TASK = {
    "segmentation": {"miou": 15.10, "pixel_acc": 51.54},
    "depth": {"abs_err": 0.7508, "rel_err": 0.3266},
    "normals": {
        "mean": 31.76,
        "median": 25.51,
        "within_11.25": 22.12,
        "within_22.5": 45.33,
        "within_30": 57.13,
    },
}
MTAN_EQUAL = {
    "segmentation": {"miou": 17.72, "pixel_acc": 55.32},
    "depth": {"abs_err": 0.5906, "rel_err": 0.2577},
    "normals": {
        "mean": 31.44,
        "median": 25.37,
        "within_11.25": 23.17,
        "within_22.5": 45.65,
        "within_30": 57.48,
    },
}
MTAN_BASELINE = Baseline(
    values=ONE_TASK, higher_is_better=HIGHER, source="MTAN paper, NYUv2 table, One task"
)


def naive(results: dict[str, dict[str, float]], base: Baseline, convention: str) -> float:
    """The two formulas of REFERENCE.md section 1, written out plainly."""
    if convention == "metric_mean":
        terms = []
        for task in base.values:
            for name, b in base.values[task].items():
                h = 1 if base.higher_is_better[task][name] else 0
                terms.append((-1.0) ** h * (results[task][name] - b) / b * 100)
        return sum(terms) / len(terms)
    per_task = []
    for task in base.values:
        gains = []
        for name, b in base.values[task].items():
            s = 1 if base.higher_is_better[task][name] else -1
            gains.append(s * (results[task][name] - b) / b)
        per_task.append(sum(gains) / len(gains))
    return sum(per_task) / len(per_task)


def test_mtan_equal_against_one_task_pinned_by_hand() -> None:
    # (-1)^h (M - B) / B * 100 for each metric, h = 1 where higher is better:
    #   mIoU    -(17.72 - 15.10) / 15.10     * 100 = -17.3510
    #   PixAcc  -(55.32 - 51.54) / 51.54     * 100 =  -7.3341
    #   Abs      (0.5906 - 0.7508) / 0.7508  * 100 = -21.3372
    #   Rel      (0.2577 - 0.3266) / 0.3266  * 100 = -21.0961
    #   Mean     (31.44 - 31.76) / 31.76     * 100 =  -1.0076
    #   Median   (25.37 - 25.51) / 25.51     * 100 =  -0.5488
    #   11.25   -(23.17 - 22.12) / 22.12     * 100 =  -4.7468
    #   22.5    -(45.65 - 45.33) / 45.33     * 100 =  -0.7059
    #   30      -(57.48 - 57.13) / 57.13     * 100 =  -0.6126
    # metric_mean: sum -74.7402 / 9 = -8.3045 (%; MTAN Equal beats One task).
    # task_mean:   seg (0.173510 + 0.073341)/2 = 0.123425, depth (0.213372 + 0.210961)/2 =
    #   0.212167, normals (0.010076 + 0.005488 + 0.047468 + 0.007059 + 0.006126)/5 = 0.015244;
    #   mean over the 3 tasks = 0.116945.
    assert delta_m(MTAN_EQUAL, MTAN_BASELINE) == pytest.approx(-8.30447, abs=1e-5)
    assert delta_m(MTAN_EQUAL, MTAN_BASELINE, "task_mean") == pytest.approx(0.116945, abs=1e-6)


def test_baseline_against_itself_is_zero() -> None:
    for convention in DELTA_M_CONVENTIONS:
        assert delta_m(ONE_TASK, MTAN_BASELINE, convention) == 0.0


@pytest.mark.parametrize("convention", ["metric_mean", "task_mean"])
@pytest.mark.parametrize("seed", range(5))
def test_both_conventions_match_the_naive_formula(convention: str, seed: int) -> None:
    rng = random.Random(seed)
    tasks = {
        f"task{t}": [f"m{m}" for m in range(rng.randint(1, 4))] for t in range(rng.randint(1, 4))
    }
    values = {t: {m: rng.uniform(-5, 5) or 1.0 for m in ms} for t, ms in tasks.items()}
    higher = {t: {m: rng.random() < 0.5 for m in ms} for t, ms in tasks.items()}
    base = Baseline(values=values, higher_is_better=higher, source="random")
    results = {t: {m: v * rng.uniform(0.5, 1.5) for m, v in ms.items()} for t, ms in values.items()}
    results["extra_task"] = {"loss": 1.0}  # values outside the baseline are ignored
    expected = naive(results, base, convention)
    assert delta_m(results, base, convention) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_conventions_can_rank_methods_differently() -> None:
    # Task "a" has one metric, task "b" three (all higher is better, baseline 1).
    # X: a +30%, each b metric -12%.  metric_mean = -(30 - 36)/4 = +1.5 (worse than 0)
    #                                 task_mean = (0.30 - 0.12)/2 = +0.09 (better than 0)
    # Y: equal to the baseline: 0 in both. metric_mean prefers Y, task_mean prefers X.
    higher = {"a": {"x": True}, "b": {"y1": True, "y2": True, "y3": True}}
    base = Baseline(
        values={"a": {"x": 1.0}, "b": {"y1": 1.0, "y2": 1.0, "y3": 1.0}},
        higher_is_better=higher,
        source="hand-made",
    )
    x = {"a": {"x": 1.3}, "b": {"y1": 0.88, "y2": 0.88, "y3": 0.88}}
    y = base.values
    assert delta_m(x, base, "metric_mean") == pytest.approx(1.5)
    assert delta_m(x, base, "task_mean") == pytest.approx(0.09)
    assert delta_m(y, base, "metric_mean") == delta_m(y, base, "task_mean") == 0.0
    assert not delta_m_higher_is_better("metric_mean")
    assert delta_m_higher_is_better("task_mean")
    # metric_mean: lower is better, so Y wins; task_mean: higher is better, so X wins.
    assert delta_m(y, base, "metric_mean") < delta_m(x, base, "metric_mean")
    assert delta_m(x, base, "task_mean") > delta_m(y, base, "task_mean")


def test_conventions_are_exactly_the_two_named() -> None:
    assert set(DELTA_M_CONVENTIONS) == {"metric_mean", "task_mean"}
    assert all(isinstance(d, str) and d for d in DELTA_M_CONVENTIONS.values())


def test_unknown_convention_lists_the_allowed_names() -> None:
    for call in (
        lambda: delta_m(MTAN_EQUAL, MTAN_BASELINE, "libmtl"),
        lambda: delta_m_higher_is_better("libmtl"),
    ):
        with pytest.raises(ConfigError, match="'metric_mean', 'task_mean'"):
            call()


def test_missing_task_or_metric_is_named() -> None:
    without_depth = {k: v for k, v in MTAN_EQUAL.items() if k != "depth"}
    with pytest.raises(ConfigError, match="'depth'"):
        delta_m(without_depth, MTAN_BASELINE)
    without_median = {**MTAN_EQUAL, "normals": {"mean": 31.44}}
    with pytest.raises(ConfigError, match=r"normals\.median"):
        delta_m(without_median, MTAN_BASELINE, "task_mean")


def test_from_results_keeps_the_named_metrics() -> None:
    results = {t: {**v, "loss": 0.5} for t, v in ONE_TASK.items()}
    base = Baseline.from_results(results, HIGHER, source="runs/stl@abc123")
    assert base == Baseline(ONE_TASK, HIGHER, "runs/stl@abc123")
    with pytest.raises(ConfigError, match=r"depth\.rel_err"):
        Baseline.from_results({**results, "depth": {"abs_err": 1.0}}, HIGHER, source="x")
    with pytest.raises(ConfigError, match="'normals'"):
        without_normals = {k: v for k, v in results.items() if k != "normals"}
        Baseline.from_results(without_normals, HIGHER, source="x")


@pytest.mark.parametrize(
    ("values", "higher", "source", "match"),
    [
        ({"d": {"a": 1.0}}, {"d": {"a": False}}, "", "`source`"),
        ({"d": {"a": 0.0}}, {"d": {"a": False}}, "s", r"d\.a is 0\.0"),
        ({"d": {"a": 1.0}}, {"e": {"a": False}}, "s", "tasks"),
        ({"d": {"a": 1.0}}, {"d": {"b": False}}, "s", "metrics"),
        ({}, {}, "s", "non-empty"),
    ],
)
def test_invalid_baseline_raises_config_error(
    values: dict[str, dict[str, float]], higher: dict[str, dict[str, bool]], source: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Baseline(values=values, higher_is_better=higher, source=source)


def test_baseline_is_immune_to_later_changes_of_its_inputs() -> None:
    values = {"d": {"a": 2.0}}
    base = Baseline(values=values, higher_is_better={"d": {"a": False}}, source="s")
    values["d"]["a"] = 0.0
    assert base.values == {"d": {"a": 2.0}}


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "baselines" / "nyuv2.json"
    MTAN_BASELINE.save(path)
    loaded = Baseline.load(path)
    assert loaded == MTAN_BASELINE
    assert delta_m(MTAN_EQUAL, loaded) == delta_m(MTAN_EQUAL, MTAN_BASELINE)


def good_content() -> dict[str, object]:
    return {
        "source": "paper",
        "values": {"depth": {"abs_err": 0.75}},
        "higher_is_better": {"depth": {"abs_err": False}},
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"source": "paper", "values": {}}), "missing the key.*higher_is_better"),
        (json.dumps({**good_content(), "comment": 1}), "unknown key.*comment"),
        (json.dumps({**good_content(), "source": ""}), "`source`"),
        (
            json.dumps({**good_content(), "values": {"depth": {"abs_err": 0}}}),
            r"depth\.abs_err is 0",
        ),
        (json.dumps({**good_content(), "values": {"depth": {"abs_err": "x"}}}), "must be a number"),
        (json.dumps({**good_content(), "values": {"seg": {"miou": 1.0}}}), "tasks"),
        (json.dumps({**good_content(), "values": {"depth": {"rel_err": 1.0}}}), "metrics"),
        (json.dumps({**good_content(), "higher_is_better": {"depth": {"abs_err": 0}}}), "bool"),
    ],
)
def test_load_errors_name_the_file_and_the_fault(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match) as info:
        Baseline.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(DataError, match="does not exist") as info:
        Baseline.load(path)
    assert str(path) in str(info.value)


def test_good_content_loads(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(good_content()), encoding="utf-8")
    assert Baseline.load(path).values == {"depth": {"abs_err": 0.75}}
