"""`ddppo bench backends`: both simulators on the same exported scenes, side by side, as JSON (no timing is asserted:
the machines are shared)."""

from __future__ import annotations

import json

from habitat_support import need_habitat

from ddppo.launch.cli import main as cli_main
from ddppo.sim.dataset_dir import has_dataset


def test_bench_backends_runs_both_simulators_on_the_same_scenes(tmp_path, capsys, monkeypatch):
    need_habitat()
    monkeypatch.setenv("HABITAT_SIM_LOG", "quiet")
    monkeypatch.setenv("MAGNUM_LOG", "quiet")
    data = tmp_path / "bench_data"
    assert cli_main(["bench", "backends", "--num-envs", "2", "--resolution", "16", "--steps", "10", "--warmup", "2",
                     "--rounds", "2", "--data-dir", str(data)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "backends" and result["habitat_sim"] == "0.3.3"
    assert len(result["rounds_embedded"]) == len(result["rounds_habitat"]) == 2
    assert result["env_steps_per_s_embedded"] > 0 and result["env_steps_per_s_habitat"] > 0
    assert result["embedded_over_habitat"] == result["env_steps_per_s_embedded"] / result["env_steps_per_s_habitat"]
    # the embedded dataset was generated, then exported beside it, and both backends ran the export
    assert has_dataset(data, "val") and result["dataset"] == str(tmp_path / "bench_data_habitat")
    assert (tmp_path / "bench_data_habitat" / "val" / "val.json.gz").is_file()
    assert any(p.suffix == ".navmesh" for p in (tmp_path / "bench_data_habitat").iterdir())


def test_bench_backends_refuses_zero_rounds_in_one_line(tmp_path, capsys):
    assert cli_main(["bench", "backends", "--rounds", "0", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rounds 0" in err
