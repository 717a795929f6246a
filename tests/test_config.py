"""Configuration: dataclass defaults <- YAML (configs/) <- key=value, validated at start with one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ddppo.config import ConfigError, PPOConfig, TrainConfig, check, load_config
from ddppo.policy import Policy
from ddppo.sim.dataset_dir import generate_dataset

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


def obs_spaces_of(cfg) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    r = cfg.sim.resolution
    spaces: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if "rgb" in cfg.sim.sensors:
        spaces["rgb"] = ((r, r, 3), torch.uint8)
    if "depth" in cfg.sim.sensors:
        spaces["depth"] = ((r, r, 1), torch.float32)
    spaces["pointgoal_with_gps_compass"] = ((2,), torch.float32)
    return spaces


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Leaves of a nested dict as dotted keys (dict-valued fields such as dataset.scenes stay whole)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("dataset.scenes", "dataset.episodes_per_scene"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def defaults() -> dict[str, object]:
    return flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))


def load_repo_config(path: Path):
    """A configs/ file as ``ddppo train`` loads it. Where habitat-sim does not import, a habitat config must fail
    with the one-line install hint; it is then checked on the embedded backend, all its other keys unchanged.
    Returns the config and the keys changed that way."""
    raw = yaml.safe_load(path.read_text()) or {}
    if (raw.get("sim") or {}).get("backend") == "habitat":
        try:
            return load_config(path), set()
        except ConfigError as e:
            assert "conda install habitat-sim" in str(e) and "\n" not in str(e), str(e)
            return load_config(path, ["sim.backend=embedded"]), {"sim.backend"}
    return load_config(path), set()


# ---------------------------------------------------------------------------------------------- configs/
def test_configs_directory_has_yaml_files():
    assert CONFIGS, "no YAML file under configs/"
    assert REPO / "configs" / "quickstart.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_loads_and_builds_a_policy(path):
    cfg, _ = load_repo_config(path)
    assert cfg.config_file == str(path)
    spaces = obs_spaces_of(cfg)
    policy = Policy(spaces, cfg.policy)
    # one step on one environment: the built policy accepts what the simulator would give it
    obs = {k: torch.zeros((1, *shape), dtype=dtype) for k, (shape, dtype) in spaces.items()}
    hidden = policy.initial_hidden(1)
    with torch.no_grad():
        actions, log_probs, values, hidden = policy.act(obs, torch.zeros(1, dtype=torch.long), torch.zeros(1), hidden)
    assert actions.shape == (1,) and 0 <= int(actions) < 4
    assert torch.isfinite(log_probs).all() and torch.isfinite(values).all()


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_yaml_only_overrides_dataclass_defaults(path):
    """Keys the YAML names take its values; every other key keeps the dataclass default (one source)."""
    raw = yaml.safe_load(path.read_text()) or {}
    in_yaml = flatten(raw)
    loaded, changed = load_repo_config(path)
    cfg = flatten(OmegaConf.to_container(loaded))
    for key, default in defaults().items():
        if key == "config_file" or key in changed:
            continue
        if key in in_yaml:
            expected = in_yaml[key]
            if isinstance(default, float) and isinstance(expected, (int, str)):
                expected = float(expected)  # YAML 5.0e-4 / 1 read as str / int, typed by the schema
            elif isinstance(default, int) and not isinstance(default, bool) and isinstance(expected, str):
                expected = int(expected.replace("_", ""))
            elif isinstance(default, dict) and isinstance(expected, dict):
                expected = {**default, **expected}  # mappings merge key by key
            assert cfg[key] == expected, key
        else:
            assert cfg[key] == default, f"{key} not in {path.name} but differs from the dataclass default"


# ---------------------------------------------------------------------------------------------- precedence
def test_yaml_then_key_value(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("name: exp\nppo:\n  num_envs: 3\n  num_mini_batch: 1\n  lr: 1.0e-3\nsim:\n  resolution: 32\n")
    cfg = load_config(f)
    assert (cfg.name, cfg.ppo.num_envs, cfg.ppo.lr, cfg.sim.resolution) == ("exp", 3, 1e-3, 32)
    assert cfg.ppo.num_steps == PPOConfig().num_steps  # not in the YAML: dataclass default
    assert cfg.ppo.ppo_epoch == PPOConfig().ppo_epoch
    assert cfg.policy.encoder == TrainConfig().policy.encoder
    cfg = load_config(f, ["ppo.num_envs=5", "sim.resolution=64", "ppo.num_steps=16"])
    assert (cfg.ppo.num_envs, cfg.sim.resolution, cfg.ppo.num_steps) == (5, 64, 16)  # key=value beats YAML
    assert cfg.ppo.lr == 1e-3 and cfg.name == "exp"
    assert isinstance(cfg.ppo.num_envs, int)


def test_no_file_means_dataclass_defaults():
    cfg = load_config(None)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(OmegaConf.structured(TrainConfig))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override,key", [
    ("ppo.num_envz=3", "ppo.num_envz"),
    ("bogus=1", "bogus"),
    ("sim.nope.deeper=1", "nope"),
])
def test_unknown_key_is_a_config_error_naming_it(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("ppo:\n  num_envz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "ppo.num_envz" in str(e.value) and str(f) in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("ppo.num_envs=abc", "ppo.num_envs"),
    ("total_steps=1.5", "total_steps"),
    ("ppo.lr=fast", "ppo.lr"),
    ("ppo.clipped_value_loss=maybe", "ppo.clipped_value_loss"),
])
def test_wrong_type_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_wrong_type_in_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ppo:\n  num_envs: abc\n")
    with pytest.raises(ConfigError, match=re.escape("ppo.num_envs")):
        load_config(f)


@pytest.mark.parametrize("overrides,key", [
    (["ppo.num_envs=2", "ppo.num_mini_batch=3"], "ppo.num_mini_batch"),
    (["ppo.num_envs=0"], "ppo.num_envs"),
    (["ppo.num_steps=2"], "ppo.num_steps"),
    (["sim.sensors=[lidar]"], "sim.sensors"),
    (["sim.resolution=32", "policy.avgpool=4"], "policy.avgpool"),
    (["ddppo.sync_frac=0"], "ddppo.sync_frac"),
    (["ddppo.backend=mpi"], "ddppo.backend"),
    (["policy.rnn_type=transformer"], "policy.rnn_type"),
    (["policy.encoder_precision=float16"], "policy.encoder_precision"),
    (["keep_checkpoints=0"], "keep_checkpoints"),
    (["ppo.value_clip=min"], "ppo.value_clip"),
    (["ppo.time_limit=ignore"], "ppo.time_limit"),
    (["policy.normalize_visual=sometimes"], "policy.normalize_visual"),
    (["policy.goal_angle=flipped"], "policy.goal_angle"),
    (["policy.compression_groups=-1"], "policy.compression_groups"),
    (["policy.conv_init=xavier"], "policy.conv_init"),
    (["ddppo.grad_weighting=equal"], "ddppo.grad_weighting"),
    (["sim.kernels=opengl"], "sim.kernels"),
    (["sim.renderer=opengl"], "sim.renderer"),
])
def test_impossible_combinations_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, overrides)


def test_normalize_visual_takes_its_earlier_boolean_form():
    """Configs saved before the key took names held true/false: they still load, as always/never."""
    for old, new in (("true", "always"), ("false", "never")):
        cfg = load_config(None, [f"policy.normalize_visual={old}"])
        policy = Policy(obs_spaces_of(cfg), cfg.policy)
        assert isinstance(policy.visual_input.normalizer, torch.nn.Identity) == (new == "never")


def test_sim_renderer_is_read_as_sim_kernels_with_one_warning(capsys):
    """sim.kernels was called sim.renderer: configs and checkpoints that set it still load, as sim.kernels, with one
    line saying so; its old default (auto, in every config saved before) says nothing; the new key wins."""
    cfg = load_config(None, ["sim.renderer=torch"])
    assert cfg.sim.kernels == "torch" and cfg.sim.renderer == ""
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "sim.renderer is deprecated, use sim.kernels" in err[0], err
    assert load_config(None, ["sim.renderer=numba", "sim.kernels=torch"]).sim.kernels == "torch"
    capsys.readouterr()
    saved = OmegaConf.to_container(OmegaConf.structured(TrainConfig))  # as a checkpoint from before the rename
    saved["sim"]["renderer"] = "auto"
    del saved["sim"]["kernels"]
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    check(cfg)
    assert cfg.sim.kernels == "auto" and capsys.readouterr().err == ""


def test_blind_agent_may_use_any_resolution():
    cfg = load_config(None, ["sim.sensors=[]", "sim.resolution=8"])
    assert list(cfg.sim.sensors) == []


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="policy.encoder"):
        load_config(None, ["policy.encoder=resnet81"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="ppo.num_envs"):
        load_config(None, ["ppo.num_envs"])


def test_missing_config_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


def test_malformed_yaml_names_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("ppo:\n  num_envs: [1\n")
    with pytest.raises(ConfigError, match=re.escape(str(f))):
        load_config(f)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    from ddppo.launch.cli import main

    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and len(err.splitlines()) == 1
    assert main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "ppo.num_envs=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ppo.num_envs" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- saved config
def test_resolved_config_saved_in_run_dir_reloads_identically(tmp_path):
    from ddppo.trainer.loop import train

    data = tmp_path / "data"
    gen = load_config(None, ["dataset.scenes={train: 1, val: 1, test: 1}",
                             "dataset.episodes_per_scene={train: 10, val: 2, test: 2}", "dataset.max_extent=6"])
    generate_dataset(data, gen.dataset, log=lambda *_: None)
    f = tmp_path / "exp.yaml"
    f.write_text("name: saved\nppo:\n  num_envs: 2\n  num_steps: 4\n  num_mini_batch: 1\n")
    cfg = load_config(f, [f"task.data_dir={data}", f"run_dir={tmp_path / 'runs'}", "total_steps=8",
                          "sim.resolution=16", "policy.encoder=simple_cnn", "policy.base_planes=8",
                          "policy.hidden_size=16", "policy.rnn_type=gru", "policy.num_recurrent_layers=1",
                          "eval_episodes=0", "device=cpu", "ppo.lr=3.0e-4"])
    train(cfg, log=lambda *a, **k: None)
    saved = tmp_path / "runs" / "saved" / "config.yaml"
    assert saved.is_file()
    reloaded = load_config(saved)
    a, b = OmegaConf.to_container(cfg), OmegaConf.to_container(reloaded)
    assert b.pop("config_file") == str(saved)
    a.pop("config_file")
    assert a == b
