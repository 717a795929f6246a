"""bench/precision_probe.py (float32 against bf16 encoders, timed in one process): it runs end to end on a config,
times both precisions on the same weights, and its speedups are the ratios of its own medians."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tiny import TINY_AGENT

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "precision_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("precision_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_times_both_precisions(capsys):
    probe = load_probe()
    out = probe.main(["--repeats", "2", *TINY_AGENT, "ppo.num_envs=4", "ppo.num_steps=8", "ppo.num_mini_batch=2",
                      "sim.sensors=[depth,rgb]"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    for term in ("learn", "act"):
        for precision in ("float32", "bfloat16"):
            rounds = out[f"{term}_ms_{precision}_rounds"]
            assert len(rounds) == 2 and all(t > 0 for t in rounds)
        assert out[f"{term}_speedup"] == pytest.approx(out[f"{term}_ms_float32"] / out[f"{term}_ms_bfloat16"])
    assert out["encoder_precisions"] == ["float32", "bfloat16"]
    assert out["learn_frames"] == 16 and out["act_envs"] == 4 and out["sensors"] == ["depth", "rgb"]


def test_probe_refuses_bad_input(capsys):
    probe = load_probe()
    with pytest.raises(SystemExit):
        probe.main(["--repeats", "0"])
    assert "--repeats 0" in capsys.readouterr().err


def test_layouts_swap_the_encoders_memory_format_and_restore_it(capsys):
    import torch

    import ddppo.policy.encoders.base as common
    from ddppo.policy.encoders import make_encoder

    probe = load_probe()
    chosen = common.in_memory_format
    seen = []
    cnn, resnet = make_encoder("simple_cnn", 4, (32, 32), 8), make_encoder("resnet18", 4, (32, 32), 8, 4)
    for enc in (cnn, resnet):
        first_conv = next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    x = torch.rand(2, 4, 32, 32)
    with probe.other_layout():
        cnn.stages(x), resnet.stages(x)
    cnn.stages(x), resnet.stages(x)
    assert seen == [True, False, False, True]  # swapped (SimpleCNN NCHW, ResNet channels-last), then as chosen
    assert common.in_memory_format is chosen

    out = probe.main(["--repeats", "1", "--layouts", *TINY_AGENT, "ppo.num_envs=2", "ppo.num_steps=4",
                      "ppo.num_mini_batch=1"])
    capsys.readouterr()
    for term in ("learn", "act"):
        for precision in ("float32", "bfloat16"):
            assert out[f"{term}_layout_gain_{precision}"] == pytest.approx(
                out[f"{term}_ms_{precision}_other_layout"] / out[f"{term}_ms_{precision}"])
    assert common.in_memory_format is chosen
