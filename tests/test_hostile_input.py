"""Hostile input: files that carry code, files that are not what they claim, configs and datasets with random
damage. Every one is refused with a one-line error naming the file, key or field, and nothing in a file runs.

- malicious pickles (their ``__reduce__`` would call ``os.system`` / ``exec``) through every path that loads a
  checkpoint-like file: ``ddppo.io.checkpoint.load``, the resume state, ``ddppo eval``, ``ddppo compare-reps`` and
  ``transfer.checkpoint``; a control test shows that the payloads do run when unpickled the unsafe way;
- property-based (hypothesis) tests of the config loader (random ``key=value`` lists and YAML files) and of the
  dataset loader (random mutations of a valid episode file);
- impossible config combinations, refused at start.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tiny import quiet, tiny

import ddppo.train as train_script  # noqa: E402
import ddppo.trainer.loop as trainer
from ddppo.config import ConfigError, TrainConfig, load_config
from ddppo.io import checkpoint
from ddppo.launch.cli import main as cli_main
from ddppo.sim.dataset import load_episodes
from ddppo.sim.dataset_dir import episodes_path, generate_dataset
from ddppo.sim.environments import make_vector_env

TINY = tiny(2, 8, "task.max_episode_steps=50", "log_interval=1", "checkpoint_interval=1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile_data") / "data"
    cfg = load_config(None, ["dataset.scenes={train: 2, val: 1, test: 1}",
                             "dataset.episodes_per_scene={train: 10, val: 5, test: 5}",
                             "dataset.min_extent=5", "dataset.max_extent=8"]).dataset
    generate_dataset(out, cfg, log=quiet)
    return out


def overrides(data_dir: Path, run_dir: Path, name: str, updates: int, *extra: str) -> list[str]:
    return [*TINY, f"task.data_dir={data_dir}", f"run_dir={run_dir}", f"name={name}", f"total_steps={updates * 16}",
            *extra]


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory) -> Path:
    """A finished 2-update run: resume.pt (update 2), resume.prev.pt (update 1), checkpoints 1 and 2."""
    root = tmp_path_factory.mktemp("good")
    trainer.train(load_config(None, overrides(data_dir, root, "good", 2)), log=quiet, show_progress=False)
    return root / "good"


def one_line_error(text: str, *must: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, text
    assert "Traceback" not in text, text
    for m in must:
        assert m in errors[0], f"{m!r} not in {errors[0]!r}"
    return errors[0]


# ---------------------------------------------------------------------------------------------- payloads
class SystemCall:
    """Unpickling calls os.system(command): the classic pickle attack."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class ExecCall:
    """Unpickling calls exec(source)."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def payload_files(directory: Path, marker: Path, template: dict) -> dict[str, Path]:
    """Checkpoint-shaped files (``template``'s fields, real tensors) with a payload that would create ``marker``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    # torch's zip format, the payload next to real weights
    out["zip-system"] = directory / "system.pt"
    torch.save({**template, "extra": SystemCall(f"touch {marker}")}, out["zip-system"])
    # the payload IS a field the loader reads
    out["zip-exec-policy"] = directory / "exec.pt"
    torch.save({**template, "policy": ExecCall(f"open({str(marker)!r}, 'w').write('pwned')")}, out["zip-exec-policy"])
    # torch's legacy (non-zip) format
    out["legacy"] = directory / "legacy.pt"
    torch.save({**template, "extra": SystemCall(f"touch {marker}")}, out["legacy"],
               _use_new_zipfile_serialization=False)
    # a plain pickle named .pt
    out["pickle"] = directory / "plain.pt"
    out["pickle"].write_bytes(pickle.dumps({**template, "extra": SystemCall(f"touch {marker}")}, protocol=4))
    return out


PAYLOADS = ["zip-system", "zip-exec-policy", "legacy", "pickle"]


@pytest.fixture(scope="module")
def payloads(good_run, tmp_path_factory) -> tuple[dict[str, Path], Path, Path]:
    """(payload files shaped like a training checkpoint, the marker they would create, a good checkpoint)."""
    root = tmp_path_factory.mktemp("payloads")
    marker = root / "PWNED"
    good = checkpoint.list_checkpoints(good_run / "checkpoints")[-1]
    return payload_files(root / "files", marker, checkpoint.load(good)), marker, good


def test_the_payloads_are_live(tmp_path):
    """Control: unpickled the unsafe way (weights_only=False, in a separate process), every payload runs. So the
    tests below, where the marker never appears, would notice a loader that runs them."""
    markers, files = {}, {}
    for name in PAYLOADS:
        markers[name] = tmp_path / f"ran_{name}"
        files[name] = str(payload_files(tmp_path / name, markers[name], {"policy": {}})[name])
    code = ("import sys, torch\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        torch.load(path, weights_only=False)\n"
            "    except Exception:\n"  # the exec payload returns None where a dict was: the load itself fails
            "        pass\n")
    subprocess.run([sys.executable, "-c", code, *files.values()], capture_output=True, timeout=120)
    for name, marker in markers.items():
        assert marker.exists(), f"payload {name} did not run even when unpickled unsafely"


@pytest.mark.parametrize("name", PAYLOADS)
def test_checkpoint_load_refuses_payloads(payloads, name):
    files, marker, _ = payloads
    with pytest.raises(ValueError) as e:
        checkpoint.load(files[name])
    msg = str(e.value)
    assert "\n" not in msg and str(files[name]) in msg and "refused" in msg, msg
    assert "weights_only=False" not in msg  # never advise the unsafe way
    if name == "zip-system":
        assert "GLOBAL posix.system" in msg or "GLOBAL os.system" in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["zip-system", "pickle"])
def test_cli_paths_refuse_payloads(payloads, good_run, data_dir, tmp_path, capsys, name):
    """`ddppo eval`, `ddppo compare-reps` (either side) and `ddppo train transfer.checkpoint=...`: exit code 2,
    one line naming the file, and the payload never runs."""
    files, marker, good = payloads
    bad = str(files[name])
    commands = [
        (cli_main, ["eval", bad, "--episodes", "1", "--agents", ""]),
        (cli_main, ["compare-reps", str(good), bad, "--probe", "50"]),
        (cli_main, ["compare-reps", bad, str(good), "--probe", "50"]),
        (train_script.main, [*overrides(data_dir, tmp_path, "transfer", 1), f"transfer.checkpoint={bad}"]),
    ]
    for main, argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err, bad, "refused")
        assert not marker.exists(), argv


@pytest.mark.parametrize("target", ["resume.pt", "resume_rank0.u0000002.pt"])
def test_resume_state_with_a_payload_falls_back_and_never_runs_it(payloads, good_run, data_dir, tmp_path, capfd,
                                                                  target):
    """A payload planted as the newest resume state (shared or a rank's file): the run warns naming the file,
    resumes from the previous set, and the payload never runs. Planted in both sets: one line, exit code 2."""
    files, marker, _ = payloads
    import shutil

    run_dir = tmp_path / "good"
    shutil.copytree(good_run, run_dir)
    shutil.copyfile(files["zip-system"], run_dir / target)
    capfd.readouterr()
    result = trainer.train(load_config(None, overrides(data_dir, tmp_path, "good", 3)), log=quiet,
                           show_progress=False)
    err = capfd.readouterr().err
    assert result["resumed_from_update"] == 1 and result["updates"] == 3
    assert any(str(run_dir / target) in line and "refused" in line for line in err.splitlines()), err
    assert not marker.exists()

    for name in ("resume.pt", "resume.prev.pt"):
        shutil.copyfile(files["legacy"], run_dir / name)
    assert train_script.main(overrides(data_dir, tmp_path, "good", 4)) == 2
    err = capfd.readouterr().err
    one_line_error(err, "resume.pt", "resume.prev.pt", "--fresh")
    assert not marker.exists()


@pytest.mark.parametrize("change, field", [
    ({"policy": "weights"}, "policy"),
    ({"policy": {"actor.weight": "not a tensor"}}, "weights"),
    ({"config": ["not", "a", "mapping"]}, "config"),
    ({"config": {"policy": {"encoder": "resnet81"}}}, "policy.encoder"),
    ({"policy": None}, "policy"),
])
def test_eval_refuses_checkpoints_that_are_not_what_they_claim(payloads, tmp_path, capsys, change, field):
    """Only tensors and plain values, so they load; but the fields are wrong: one line naming file and field."""
    _, _, good = payloads
    ck = {**checkpoint.load(good), **change}
    path = tmp_path / "odd.pt"
    checkpoint.save(ck, path)
    assert cli_main(["eval", str(path), "--episodes", "1", "--agents", ""]) == 2
    one_line_error(capsys.readouterr().err, str(path), field)


# ---------------------------------------------------------------------------------------------- config loader
def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Leaves as dotted keys (the dict-valued fields dataset.scenes / episodes_per_scene stay whole)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("dataset.scenes", "dataset.episodes_per_scene"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


DEFAULTS = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
KEYS = sorted(k for k in DEFAULTS if k != "config_file")

scalars = st.one_of(
    st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["auto", "cpu", "depth", "rgb", "gru", "lstm", "simple_cnn", "1e-3",
                                           "0", "-1", "[]", "{}", "[depth, rgb]", "???", "${name}", "${oops}"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=2))
unknown_keys = st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True).filter(lambda k: k not in DEFAULTS)
keys = st.one_of(st.sampled_from(KEYS), unknown_keys)


def as_override(key: str, value) -> str:
    if isinstance(value, str):
        return f"{key}={value}"  # raw text, as a shell would pass it
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


def nested(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a key both a leaf and a section: the later wins
                nxt = node[p] = {}
            node = nxt
        node[leaf] = value
    return out


def assert_valid_or_one_line_error(load, named: list[str]):
    """Either a config that passes the checks again, or a ConfigError: one line, naming a key it was given."""
    try:
        cfg = load()
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        parts = {p for k in named for p in (k, k.split(".")[-1], k.split(".")[0])}
        assert any(p in msg for p in parts), f"{msg!r} names none of {named}"
        return None
    from ddppo.config import check

    check(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # a valid config resolves completely (no dangling ${...})
    return cfg


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=4))
def test_random_key_value_overrides(items):
    argv = [as_override(k, v) for k, v in items]
    assert_valid_or_one_line_error(lambda: load_config(None, argv), [k for k, _ in items])


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, values, min_size=1, max_size=4))
def test_random_yaml_files(tmp_path, flat):
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(nested(flat)))
    assert_valid_or_one_line_error(lambda: load_config(path), [*flat, str(path)])


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_random_yaml_text(tmp_path, text):
    path = tmp_path / "junk.yaml"
    path.write_text(text)
    assert_valid_or_one_line_error(lambda: load_config(path), [str(path)])


@pytest.mark.parametrize("override, key", [
    (["ppo.num_envs=2", "ppo.num_mini_batch=3"], "ppo.num_mini_batch"),  # more minibatches than environments
    (["log_interval=0"], "log_interval"),
    (["checkpoint_interval=0"], "checkpoint_interval"),
    (["eval_interval=-1"], "eval_interval"),
    (["eval_episodes=-5"], "eval_episodes"),
    (["num_threads=-1"], "num_threads"),
    (["ppo.clip=0"], "ppo.clip"),
    (["ppo.eps=0"], "ppo.eps"),
    (["ppo.max_grad_norm=0"], "ppo.max_grad_norm"),
    (["ppo.value_coef=-1"], "ppo.value_coef"),
    (["ppo.entropy_coef=-0.1"], "ppo.entropy_coef"),
    (["ppo.lr=nan"], "ppo.lr"),
    (["ppo.lr=inf"], "ppo.lr"),
    (["ppo.max_bad_updates=0"], "ppo.max_bad_updates"),
    (["sim.forward_step=0"], "sim.forward_step"),
    (["sim.turn_angle=0"], "sim.turn_angle"),
    (["sim.max_depth=-1"], "sim.max_depth"),
    (["task.success_distance=0"], "task.success_distance"),
    (["policy.hidden_size=0"], "policy.hidden_size"),
    (["policy.num_recurrent_layers=0"], "policy.num_recurrent_layers"),
    (["policy.base_planes=0"], "policy.base_planes"),
    (["policy.ngroups=0"], "policy.ngroups"),
    (["ddppo.sync_frac=nan"], "ddppo.sync_frac"),
])
def test_impossible_values_are_refused_at_start(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        load_config(None, override)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- dataset loader
@pytest.fixture(scope="module")
def valid_episodes(data_dir) -> list[dict]:
    with gzip.open(episodes_path(data_dir, "val"), "rt") as f:
        return json.load(f)["episodes"]


junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=5), st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=2)), max_size=5),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# the fields load_episodes validates, with the name its errors use
CHECKED = {"episode_id": "episode_id", "scene_id": "scene_id", "start_position": "start_position",
           "start_rotation": "start_rotation", "goals": "goals", "goals.0.position": "goals[0].position"}


def mutate(episode: dict, path: str, value, delete: bool) -> dict:
    ep = json.loads(json.dumps(episode))
    node, *rest = path.split(".")
    target, key = ep, node
    for part in rest:
        target = target[key]
        key = int(part) if part.isdigit() else part
    if delete:
        del target[key]
    else:
        target[key] = value
    return ep


def write_episodes(path: Path, episodes: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"episodes": episodes}, f)
    return path


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 4), field=st.sampled_from(sorted(CHECKED)), value=junk, delete=st.booleans())
def test_random_episode_damage_is_one_line_naming_file_and_field(tmp_path, valid_episodes, index, field, value,
                                                                 delete):
    """One episode of a valid file gets a field deleted or replaced by junk: either it still is a valid episode
    (the junk happened to fit), or load_episodes raises a one-line ValueError naming the file and the field."""
    if field == "scene_id" and not delete and isinstance(value, (str, int, float, bool)):
        value = [value]  # a scalar scene id is fine by the schema (ids are str()-ed); a container is not
    episodes = list(valid_episodes[:5])
    episodes[index] = mutate(episodes[index], field, value, delete)
    path = write_episodes(tmp_path / "val" / "val.json.gz", episodes)
    try:
        loaded = load_episodes(path)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        assert f"'{CHECKED[field]}'" in msg or (field == "goals.0.position" and "'goals'" in msg), msg
        return
    assert len(loaded) == 5
    ep = loaded[index]
    for coords in (ep.start_position, ep.goal_position, ep.start_rotation):
        assert all(isinstance(c, float) and c == c and abs(c) != float("inf") for c in coords)


@pytest.mark.parametrize("field, value", [("goals.0.radius", "wide"), ("goals.0.radius", [1.0]),
                                          ("info.geodesic_distance", {"m": 3})])
def test_optional_episode_fields_with_junk_name_file_and_field(tmp_path, valid_episodes, field, value):
    path = write_episodes(tmp_path / "val" / "val.json.gz",
                          [valid_episodes[0], mutate(valid_episodes[1], field, value, False)])
    with pytest.raises(ValueError) as e:
        load_episodes(path)
    assert str(path) in str(e.value) and field.split(".")[-1] in str(e.value)


def test_episode_outside_its_scene_is_refused_before_any_work(data_dir, tmp_path, valid_episodes):
    import shutil

    bad_dir = tmp_path / "data"
    shutil.copytree(data_dir, bad_dir)
    episodes = list(valid_episodes)
    episodes[-1] = mutate(episodes[-1], "start_position", [500.0, 0.0, -500.0], False)  # far outside the scene
    path = write_episodes(episodes_path(bad_dir, "val"), episodes)
    cfg = load_config(None, [f"task.data_dir={bad_dir}", "sim.resolution=16"])
    with pytest.raises(ValueError) as e:
        make_vector_env(cfg, "val", 1)
    assert str(path) in str(e.value) and "'start_position'" in str(e.value)
