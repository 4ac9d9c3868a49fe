"""Bad component options and numbers that are not numbers: one line, exit code 2, nothing written.

Each case trains a tiny recipe with overrides on the command line (a forked process, see
``cli_harness``); every one is refused before anything is built or written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_harness import assert_refused, assert_unchanged, run_cli, snapshot, write

from helpers import tiny_config_dict

NO_BACKBONE_OPTIONS = "model.backbone_options={}"

OPTION_CASES = [
    # -- the types the builders' annotations declare -----------------------------------
    (
        ["model.backbone_options.channels=27"],
        ["model.backbone_options.channels: expected a list of integers", "found 27."],
    ),
    (["model.backbone_options.channels=abc"], ["model.backbone_options.channels", "found 'abc'"]),
    (
        ["model.backbone_options.channels=[]"],
        ["model.backbone_options.channels", "1 to 64 items", "found []"],
    ),
    (
        ["model.backbone_options.channels=[8, 0]"],
        ["model.backbone_options.channels", ">= 1", "found [8, 0]"],
    ),
    (
        ["model.backbone_options.channels=[8, -1]"],
        ["model.backbone_options.channels", "found [8, -1]"],
    ),
    (["model.backbone_options.channels=[8, 5000]"], ["model.backbone_options.channels", "<= 4096"]),
    (["model.backbone_options.channels=[8.5]"], ["model.backbone_options.channels", "found [8.5]"]),
    (
        ["model.backbone_options.channels=[true]"],
        ["model.backbone_options.channels", "found [True]"],
    ),
    (
        ["model.backbone_options.channels=[8, null]"],
        ["model.backbone_options.channels", "found [8, None]"],
    ),
    (
        ["model.backbone_options.channels={a: 1}"],
        ["model.backbone_options.channels", "found {'a': 1}"],
    ),
    (
        ["model.backbone_options.out_features=[true]"],
        ["model.backbone_options.out_features: expected an integer", "found [True]"],
    ),
    (
        ["model.backbone_options.out_features=.nan"],
        ["model.backbone_options.out_features", "found nan"],
    ),
    (
        ["model.backbone_options.out_features=9e10"],
        ["model.backbone_options.out_features", "<= 16384", "found '9e10'"],
    ),
    (
        ["model.backbone_options.out_features=0"],
        ["model.backbone_options.out_features", ">= 1", "found 0"],
    ),
    (
        ["model.backbone_options.out_features=1.5"],
        ["model.backbone_options.out_features", "found 1.5"],
    ),
    (
        ["model.backbone_options.out_features=null"],
        ["model.backbone_options.out_features", "found None"],
    ),
    (
        ["model.backbone_options.out_features=sixteen"],
        ["model.backbone_options.out_features", "found 'sixteen'"],
    ),
    (
        ["model.backbone_options.channels=[4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096]"],
        ["model.backbone_options: the estimated number of parameters", "above the limit of 1e+09"],
    ),
    (
        [NO_BACKBONE_OPTIONS, "model.backbone=mlp", "model.backbone_options.dropout=1.0"],
        ["model.backbone_options.dropout", "< 1", "found 1.0"],
    ),
    (
        [NO_BACKBONE_OPTIONS, "model.backbone=mlp", "model.backbone_options.hidden=[0]"],
        ["model.backbone_options.hidden", "found [0]"],
    ),
    (
        [
            NO_BACKBONE_OPTIONS,
            "model.backbone=resnet",
            "model.backbone_options.blocks_per_stage=1000",
        ],
        ["model.backbone_options.blocks_per_stage", "<= 64"],
    ),
    (
        [NO_BACKBONE_OPTIONS, "model.backbone=segnet", "model.backbone_options.width=.inf"],
        ["model.backbone_options.width: expected a finite number", "found inf"],
    ),
    (
        [NO_BACKBONE_OPTIONS, "model.backbone=lenet", "model.backbone_options.kernels=[5, 500]"],
        ["model.backbone_options.kernels", "<= 64"],
    ),
    # -- data set sizes that cannot be allocated, seeds ---------------------------------
    (["data.options.n_train=1e13"], ["data.options.n_train", "<= 10000000", "found '1e13'"]),
    (["data.options.n_train=-5"], ["data.options.n_train", ">= 1", "found -5"]),
    (["data.options.n_val=2.5"], ["data.options.n_val", "found 2.5"]),
    (["data.options.n_test=abc"], ["data.options.n_test", "found 'abc'"]),
    (["data.options.canvas=1e6"], ["data.options.canvas", "<= 512", "found '1e6'"]),
    (
        ["data.name=multimnist", "data.options={}", "data.options.canvas=1e6"],
        ["data.options.canvas", "<= 512"],
    ),
    (["data.options.canvas=4"], ["data.options.canvas", ">= 12", "found 4"]),
    (
        ["data.options.n_train=9000000", "data.options.canvas=512"],
        ["data.options: the values generated", "8 GiB of float32", "lower data.options.n_train"],
    ),
    (["data.options.seed=-1"], ["data.options.seed", ">= 0", "found -1"]),
    (["data.options.seed=18446744073709551616"], ["data.options.seed", "<= 18446744073709551615"]),
    (["seed=-1"], ["seed: expected a value >= 0", "found -1"]),
    (["seed=18446744073709551616"], ["seed: expected a value <= 4294967295"]),
    (["data.options.label_fraction=0"], ["data.options.label_fraction", "> 0", "found 0"]),
    (["data.options.label_fraction=1.5"], ["data.options.label_fraction", "<= 1"]),
    (["data.options.label_fraction=.nan"], ["data.options.label_fraction", "found nan"]),
    (
        ["data.options.with_sum=maybe"],
        ["data.options.with_sum: expected true or false", "found 'maybe'"],
    ),
    (["data.options.with_sum=1"], ["data.options.with_sum: expected true or false", "found 1"]),
    # -- architectures --------------------------------------------------------------------
    (
        ["model.architecture=mmoe", "model.options.num_experts=1e9"],
        ["model.options.num_experts", "<= 64"],
    ),
    (
        ["model.architecture=cross_stitch", "model.options.init=[1]"],
        ["model.options.init", "(2 items)", "found [1]"],
    ),
    (
        ["model.architecture=cross_stitch", "model.options.init=[.nan, 0.1]"],
        ["model.options.init", "finite numbers"],
    ),
    (
        ["model.architecture=cross_stitch", "model.options.lr_multiplier=.nan"],
        ["model.options.lr_multiplier", "found nan"],
    ),
    (
        ["model.architecture=cross_stitch", "model.options.granularity=pixel"],
        ["model.options.granularity: expected one of channel, layer", "found 'pixel'"],
    ),
    (
        ["model.architecture=soft", "model.options.weight=-1"],
        ["model.options.weight", ">= 0", "found -1"],
    ),
    (
        ["model.architecture=soft", "model.options.penalty=l1"],
        ["model.options.penalty", "found 'l1'"],
    ),
    # -- balancing methods ----------------------------------------------------------------
    (
        ["balancer.name=cagrad", "balancer.options.c=.nan"],
        ["balancer.options.c: expected a finite number", "found nan"],
    ),
    (["balancer.name=famo", "balancer.options.lr=.inf"], ["balancer.options.lr", "found inf"]),
    (
        ["balancer.name=famo", "balancer.options.min_losses={left: .nan}"],
        ["balancer.options.min_losses", "a mapping to finite numbers"],
    ),
    (
        ["balancer.name=dwa", "balancer.options.window=2.5"],
        ["balancer.options.window", "found 2.5"],
    ),
    (["balancer.name=rlw", "balancer.options.seed=-1"], ["balancer.options.seed", "found -1"]),
    (
        ["balancer.name=graddrop", "balancer.options.seed=99999999999999999999999"],
        ["balancer.options.seed", "<= 18446744073709551615"],
    ),
    (
        ["balancer.name=cagrad", "balancer.options.level=loss"],
        ["balancer.options.level: expected one of", "found 'loss'"],
    ),
    # -- unknown names still get a suggestion ---------------------------------------------
    (
        ["model.backbone_options.chanels=[4]"],
        ["unknown option model.backbone_options.chanels", "Did you mean 'channels'?"],
    ),
    (
        ["balancer.name=pcgrad", "balancer.options.sed=1"],
        ["unknown option balancer.options.sed", "Did you mean 'seed'?"],
    ),
]

NUMBER_CASES = [
    (["optim.lr=.nan"], ["optim.lr: expected a finite number", "found nan"]),
    (["optim.lr=.inf"], ["optim.lr: expected a finite number"]),
    (["optim.lr=-.inf"], ["optim.lr: expected a finite number"]),
    (["optim.lr=nan"], ["optim.lr: expected a finite number"]),
    (["optim.lr=1e400"], ["optim.lr: expected a finite number"]),
    (["optim.lr=1" + "0" * 400], ["optim.lr: expected a finite number"]),
    (["optim.lr=1e39"], ["optim.lr: expected a value <= 3.4028234663852886e+38", "found 1e+39"]),
    (["optim.momentum=.nan"], ["optim.momentum: expected a finite number"]),
    (["optim.weight_decay=.inf"], ["optim.weight_decay: expected a finite number"]),
    (["optim.grad_clip=.nan"], ["optim.grad_clip: expected a finite number"]),
    (["optim.scheduler.gamma=.inf"], ["optim.scheduler.gamma: expected a finite number"]),
    (["optim.scheduler.min_lr=.nan"], ["optim.scheduler.min_lr: expected a finite number"]),
    (["balancer.lr=.inf"], ["balancer.lr: expected a finite number"]),
    (["balancer.lr=1e39"], ["balancer.lr: expected a value <= 3.4028234663852886e+38"]),
]


def _id(overrides: list[str]) -> str:
    return " ".join(overrides)[-60:]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write(tmp_path / "recipe.yaml", yaml.safe_dump(tiny_config_dict(tmp_path / "runs")))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [pytest.param(o, f, id=_id(o)) for o, f in OPTION_CASES + NUMBER_CASES],
)
def test_refused_before_anything_is_written(
    recipe: Path, tmp_path: Path, overrides: list[str], fragments: list[str]
) -> None:
    before = snapshot(tmp_path)
    result = run_cli("train", recipe, *overrides, "--quiet", cwd=tmp_path)
    assert_refused(result, *fragments)
    assert_unchanged(before, tmp_path)


def test_the_corpus_is_large_enough() -> None:
    assert len(OPTION_CASES) + len(NUMBER_CASES) >= 45
