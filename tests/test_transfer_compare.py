"""``ddppo compare-reps`` end to end on tiny checkpoints: output files and keys, identical networks score 1, the
random-init baseline scores lower, the seeded probe set, the datapoints-per-neuron guard, layer selection."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import quiet, tiny

from ddppo.analysis.compare import compare, probe_observations
from ddppo.analysis.similarity import InsufficientDatapointsWarning
from ddppo.config import load_config
from ddppo.launch.cli import main as cli_main
from ddppo.sim.dataset_dir import generate_dataset
from ddppo.trainer.loop import train

TINY = tiny(2, 8, "task.max_episode_steps=40", "total_steps=32", "checkpoint_interval=2")
LAYERS = ["layers.0", "layers.1", "layers.2", "visual_fc"]  # SimpleCNN's three convs, then the FC


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Two 2-update PointNav runs of different seeds, and a byte copy of the first."""
    root = tmp_path_factory.mktemp("compare")
    data = root / "data"
    generate_dataset(data, load_config(None, ["dataset.scenes={train: 2, val: 2, test: 0}",
                                              "dataset.episodes_per_scene={train: 10, val: 4, test: 0}",
                                              "dataset.min_extent=4", "dataset.max_extent=6"]).dataset, log=quiet)
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        train(load_config(None, [*TINY, f"task.data_dir={data}", f"run_dir={root}", f"name={name}", f"seed={seed}"]),
              log=quiet)
        out[name] = sorted((root / name / "checkpoints").glob("ckpt_*.pt"))[-1]
    out["a_copy"] = root / "a_copy.pt"
    shutil.copy(out["a"], out["a_copy"])
    return out


def test_compare_reps_end_to_end(ckpts, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli_main(["compare-reps", str(ckpts["a"]), str(ckpts["a_copy"]), "--probe", "240", "--baseline",
                   str(ckpts["b"]), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "compare_reps.json").read_text())
    assert {"checkpoints", "runs", "tasks", "probe", "layers_a", "layers_b", "neurons_a", "neurons_b", "datapoints",
            "pwcca", "cka", "per_layer"} <= set(result)
    assert result["layers_a"] == result["layers_b"] == LAYERS
    assert result["neurons_a"] == {"layers.0": 8, "layers.1": 16, "layers.2": 8, "visual_fc": 32}
    assert result["probe"]["observations"] == 240 and result["probe"]["split"] == "val"
    assert set(result["datapoints"].values()) == {240}  # pooled conv maps: one datapoint per image
    for k, name in enumerate(LAYERS):
        row = result["per_layer"][name]
        # CKA is exact; PWCCA's ridge (epsilon 1e-6 on nearly collinear ReLU units) leaves it a hair below 1
        assert row["pwcca"] == pytest.approx(1.0, abs=1e-3) and row["cka"] == pytest.approx(1.0, abs=1e-9)
        assert result["pwcca"][k][k] == row["pwcca"]
        # an untrained network of the same architecture is clearly less alike
        assert row["pwcca_a_vs_random_a"] < 0.97 and row["cka_a_vs_random_a"] < 0.99, name
        assert 0.0 <= row["pwcca_a_vs_baseline"] <= 1.0 and 0.0 <= row["cka_a_vs_baseline"] <= 1.0
    assert np.array(result["pwcca"], float).shape == (4, 4)
    with Image.open(out / "compare_reps.png") as im:
        assert im.size[0] > 500 and im.size[1] > 200
    printed = capsys.readouterr().out
    assert all(name in printed for name in LAYERS) and "PWCCA A-B" in printed and "PWCCA A-rand" in printed


def test_probe_set_is_fixed_by_its_seed(ckpts):
    from ddppo.evaluation.trained_policy import policy_from_checkpoint

    _, cfg = policy_from_checkpoint(ckpts["a"])
    one, two = probe_observations(cfg, ["depth"], 40, seed=5), probe_observations(cfg, ["depth"], 40, seed=5)
    other = probe_observations(cfg, ["depth"], 40, seed=6)
    assert one["depth"].shape == (40, 16, 16, 1) and torch.equal(one["depth"], two["depth"])
    assert not torch.equal(one["depth"], other["depth"])
    # not 40 copies of a few views: the walks move and restart at other episodes
    assert len({tuple(v.flatten().tolist()) for v in one["depth"]}) > 30


def test_too_few_datapoints_per_neuron_is_refused_or_warned(ckpts):
    with pytest.raises(ValueError, match=r"visual_fc x visual_fc: 100 datapoints for 32 neurons .*--probe to >= 160"):
        compare(str(ckpts["a"]), str(ckpts["b"]), probe=100, layers=["visual_fc"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compare(str(ckpts["a"]), str(ckpts["b"]), probe=100, layers=["visual_fc"], min_ratio=1.0)
    assert any(issubclass(w.category, InsufficientDatapointsWarning) for w in caught)
    assert list(result["per_layer"]) == ["visual_fc"]


def test_layer_selection_and_positions_mode(ckpts):
    with pytest.raises(ValueError, match=r"--layers: unknown layer\(s\) \['conv9'\]"):
        compare(str(ckpts["a"]), str(ckpts["b"]), probe=64, layers=["conv9"])
    result = compare(str(ckpts["a"]), str(ckpts["b"]), probe=64, layers=["layers.0", "layers.2"], conv="positions")
    assert result["layers_a"] == ["layers.0", "layers.2"]
    # 16x16 depth through SimpleCNN's 3x3 stride-1 convs: 14x14 and 10x10 maps, so the cross pairs do not pair
    assert result["pwcca"][0][1] is None and result["pwcca"][1][0] is None
    assert result["datapoints"] == {"layers.0": 64 * 14 * 14, "layers.2": 64 * 10 * 10}
    assert all(0 <= result["pwcca"][k][k] <= 1 for k in range(2))
