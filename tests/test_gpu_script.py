"""bench/gpu_check.sh runs only on a lent GPU machine, where a broken command costs scarce device time: check here
that it is valid bash and that every `ddppo` command and every config override in it parses."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from ddppo.config import load_config
from ddppo.launch.cli import build_parser

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"


def ddppo_commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        m = re.search(r"python -m ddppo (.*?)(?:>|\||$)", line)
        if m:
            # the script's loop variables: $n environments, $p the encoder precision
            command = m.group(1).replace("$n", "64").replace("$p", "bfloat16").replace('"$OUT', '"out')
            commands.append(shlex.split(command))
    return commands


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_ddppo_command_parses():
    commands = ddppo_commands()
    assert len(commands) >= 3, commands
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        overrides = getattr(args, "overrides", None) or []
        if argv[:2] == ["bench", "train"]:
            load_config(args.config, overrides)  # unknown keys or wrong types fail here, not on the GPU machine


def test_torchrun_overrides_load():
    text = SCRIPT.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "ddppo/train.py" in ln)
    argv = shlex.split(line.split("ddppo/train.py", 1)[1].split("2>&1")[0].replace('"$OUT', '"out'))
    assert argv[0] == "--config"
    load_config(argv[1], [a for a in argv[2:] if "=" in a])
