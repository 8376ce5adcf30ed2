"""The benchmark scripts' shared helpers (tools/benchlib.py)."""

import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from benchlib import child_env  # noqa: E402


def test_a_relative_data_folder_still_resolves_in_a_subprocess_run_from_elsewhere(tmp_path, monkeypatch):
    # The usage lines say QUIKFT_DATA=../shared/data; the rows run from another directory.
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("QUIKFT_DATA", "../data")
    env = child_env(Path("code"), {"OMP_NUM_THREADS": "1"})
    seen = subprocess.run([sys.executable, "-c", "import os; print(os.path.isdir(os.environ['QUIKFT_DATA']))"],
                          env=env, cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert seen == "True"
    assert env["PYTHONPATH"] == "code" and env["OMP_NUM_THREADS"] == "1"


def test_an_unset_data_folder_stays_unset(monkeypatch):
    monkeypatch.delenv("QUIKFT_DATA", raising=False)
    assert "QUIKFT_DATA" not in child_env(Path("code"))
