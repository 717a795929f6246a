"""``configs/pointnav/laptop_depth.yaml`` kept honest: on default-size scenes (the dataset defaults: 5-30 m, up to 12
rooms, geodesic up to 30 m) the config learns, judged on held-out val scenes against the untrained policy of the
same architecture, both evaluated by ``ddppo eval``.

Short form (CI): the first 1.5M frames of the config's schedule (its learning rate held at the start value, where
the full run's decay still leaves >= 85% of it) on 12 training scenes of the default size, ~8 minutes on 2 quiet
cores. Measured (cpu2 EPYC, 2026-12-07): val success 0.38 +- 0.10, SoftSPL 0.51, 6.3 m from the goal at the end,
against 0.00, 0.00 and 16.2 m for the untrained policy. DDPPO_LONG_TESTS=1
trains the config as it stands (10M frames on the whole default dataset, about an hour alone on 2 cores) and asks
for a little less than bench/RESULTS.md reports over every val episode (success 0.800, SPL 0.651): the issue's
target, SPL 0.8, is not reached, and docs/laptop_scale.md says what limits it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny import quiet

from ddppo.config import DatasetConfig, load_config
from ddppo.launch.cli import main as cli_main
from ddppo.trainer.loop import train

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pointnav" / "laptop_depth.yaml"
LONG = os.environ.get("DDPPO_LONG_TESTS") == "1"


def evaluate(run_dir: Path, out: Path, episodes: int) -> dict:
    """``ddppo eval`` of the run's last checkpoint beside the untrained policy (ddppo's protocol: most likely
    action); the summary it writes."""
    agents = "untrained" if not LONG else ""
    assert cli_main(["eval", str(run_dir), "--agents", agents, "--episodes", str(episodes), "--num-envs", "16",
                     "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_laptop_depth_config_learns_on_default_size_scenes(tmp_path):
    sizes = [] if LONG else ["dataset.scenes={train: 12, val: 5, test: 1}", "total_steps=1536000",
                                     "ppo.lr_decay=false"]
    cfg = load_config(CONFIG, [f"task.data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'runs'}", "eval_episodes=0",
                               "eval_interval=0", "checkpoint_interval=1000", *sizes])
    defaults = OmegaConf.structured(DatasetConfig)
    for key in ("min_extent", "max_extent", "max_rooms", "max_objects_per_room", "min_geodesic", "max_geodesic"):
        assert cfg.dataset[key] == defaults[key], f"dataset.{key}: the config must train on default-size scenes"

    train(cfg, log=quiet, show_progress=False)
    summary = evaluate(tmp_path / "runs" / cfg.name, tmp_path / "eval", episodes=0 if LONG else 100)
    trained = summary["checkpoint"]
    if LONG:  # the release check (docs/laptop_scale.md): its figures go to bench/RESULTS.md
        print("laptop_depth, 10M frames, all val episodes:", json.dumps(trained))
        assert trained["episodes"] == 200 and trained["success"] >= 0.75 and trained["spl"] >= 0.6, trained
        return
    untrained = summary["untrained"]
    msg = f"trained {trained}\nuntrained {untrained}"
    # an untrained policy never calls STOP at the goal; the margins are about half of what the measured run showed
    assert trained["success"] >= untrained["success"] + 0.15, msg
    assert trained["softspl"] >= untrained["softspl"] + 0.25, msg
    assert trained["distance_to_goal"] <= untrained["distance_to_goal"] - 4.0, msg
