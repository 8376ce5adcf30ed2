"""Issue 13: every case a hostile new user hit gives a one-line error (or the right result) and leaves
no partial output. Each test here failed on the code before the issue."""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import recover_config
from safetensors.torch import load_file, save_file
from test_checkpoint import CORRUPTIONS, DOWN

import quikft.models
from quikft.checkpoint import load, read_header
from quikft.cli import main
from quikft.recovery import MODES, recover
from quikft.recovery.loss import Loss
from quikft.recovery.sharding import Sharding

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def _one_line_error(result, *fragments):
    """Exit 1 with one ``Error:`` line (after a recover's progress lines, if any), naming ``fragments``."""
    assert result.exit_code == 1, result.output
    assert result.output.count("Error: ") == 1 and "Traceback" not in result.output, result.output
    line = result.output.rstrip("\n").splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in line, result.output


def _quantize_args(tiny_dir, text_file, out, *extra):
    return ["quantize", "--model", tiny_dir, "--calib", text_file, "--nsamples", "4", "--seqlen", "32",
            "--salient", "4", "--group-size", "32", "--no-clip-search", "--eval-windows", "0", "--out", out, *extra]


def _recover_args(model, corpus, out, *extra):
    return ["recover", "--model", model, "--data", corpus["text"], "--steps", "2", "--batch-size", "2",
            "--seqlen", "32", "--eval-windows", "0", "--fp32", "--out", out, *extra]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- nothing is unpickled

class _Exploit:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_pickle_in_the_state_directory_never_runs(packed, corpus, tmp_path):
    out = tmp_path / "out"
    state_dir = out.with_name("out.train-state")
    state_dir.mkdir()
    marker = tmp_path / "pwned"
    # The file names the old format used, holding pickles that create a file when unpickled.
    for name in ("training_state.pt", "rng-0.pt"):
        torch.save({"step": 2, "payload": _Exploit(marker)}, state_dir / name)
    args = ["recover", "--model", str(packed), "--data", corpus["text"], "--steps", "4", "--batch-size", "2",
            "--seqlen", "32", "--eval-windows", "0", "--fp32", "--resume", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--resume: no training state" in result.output
    assert result.output.count("\n") == 1 and not marker.exists()


def test_the_package_never_unpickles():
    for path in (REPO / "quikft").rglob("*.py"):
        text = path.read_text()
        for needle in ("weights_only=False", "import pickle", "pickle.load", "torch.load(", "dill", "joblib"):
            assert needle not in text, f"{path.relative_to(REPO)} contains {needle}"


# ----------------------------------------------------------------------------- outputs never destroy data

def test_out_naming_an_unrelated_directory_is_refused(tiny_dir, text_file, packed, corpus, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _one_line_error(_cli(*_quantize_args(tiny_dir, text_file, mine)), "not a previous output")
    _one_line_error(_cli(*_recover_args(packed, corpus, mine)), "not a previous output")
    assert _snapshot(mine) == {"thesis.tex": b"years of work"}
    _one_line_error(_cli(*_quantize_args(tiny_dir, text_file, mine, "--overwrite")), "not a previous output")
    assert _snapshot(mine) == {"thesis.tex": b"years of work"}


def test_out_equal_to_or_inside_the_model_is_refused(packed, corpus, tmp_path):
    model = Path(shutil.copytree(packed, tmp_path / "model"))
    before = _snapshot(model)
    for out in (model, model / "sub"):
        _one_line_error(_cli(*_recover_args(model, corpus, out, "--overwrite")), "overlaps the input")
    assert _snapshot(model) == before


def test_overwrite_replaces_a_previous_output_and_only_on_request(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    assert _cli(*_quantize_args(tiny_dir, text_file, out)).exit_code == 0
    first = _snapshot(out)
    _one_line_error(_cli(*_quantize_args(tiny_dir, text_file, out, "--bits", "4")), "pass --overwrite")
    assert _snapshot(out) == first
    assert _cli(*_quantize_args(tiny_dir, text_file, out, "--bits", "4", "--overwrite")).exit_code == 0
    assert json.loads((out / "quantize_report.json").read_text())["config"]["bits"] == 4
    assert _leftovers(tmp_path) == []


def test_unwritable_out_is_refused_before_any_work(tiny_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(quikft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _one_line_error(_cli(*_quantize_args(tiny_dir, text_file, blocker / "out")), "is not a directory")
    _one_line_error(_cli(*_quantize_args(tiny_dir, text_file, "/proc/quikft-test/out")), "not writable")
    _one_line_error(_cli(*_quantize_args(tiny_dir, text_file, blocker)), "is not a directory")


def test_resume_without_a_state_is_a_one_line_error(packed, corpus, tmp_path):
    _one_line_error(_cli(*_recover_args(packed, corpus, tmp_path / "out", "--resume")), "no training state")


def test_stale_partials_of_killed_runs_are_removed_by_the_next_run(tiny_dir, text_file, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    stale = [tmp_path / f".run.{dead.pid}.x1y2.partial", tmp_path / f".run.old.{dead.pid}"]
    live = tmp_path / f".run.{os.getpid()}.abcd.partial"  # ours: never removed under a running job
    for path in (*stale, live):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    unrelated = tmp_path / ".other.123.partial"
    unrelated.mkdir()
    assert _cli(*_quantize_args(tiny_dir, text_file, tmp_path / "run")).exit_code == 0
    assert not any(p.exists() for p in stale) and live.exists() and unrelated.exists()


def test_sigterm_cleans_up_like_ctrl_c_and_keeps_the_resumable_state(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    args = _quantize_args(tiny_dir, text_file, out)
    args[args.index("--nsamples") + 1] = "64"  # long enough to be caught mid-run
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "quikft.cli", *map(str, args)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    state = tmp_path / "run.quantize-state"
    while not (state / "progress.json").exists():  # the first block is committed
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert _leftovers(tmp_path) == [] and not out.exists()
    resumed = _cli(*map(str, args), "--resume")  # a terminated quantize continues where it stopped
    assert resumed.exit_code == 0, resumed.output
    assert (out / "quantize_report.json").is_file() and not state.exists()


# ----------------------------------------------------------------------------- non-finite numbers

def test_a_diverging_recovery_stops_with_a_one_line_error_and_writes_nothing(packed, corpus, tmp_path):
    out = tmp_path / "out"
    result = _cli(*_recover_args(packed, corpus, out, "--lr", "1e6", "--steps", "6", "--save-every", "1"))
    _one_line_error(result, "--lr 1e+06", "likely cause")
    assert re.search(r"step \d+ of 6: the (training loss is|gradient norm is|trained columns reach)", result.output)
    assert not out.exists() and _leftovers(tmp_path) == []
    state = out.with_name("out.train-state")
    assert "the last resumable state (step" in result.output and (state / "latest.json").is_file()


def test_trained_values_beyond_fp16_stop_the_step_that_produced_them(packed, corpus, tmp_path):
    # A learning rate that keeps every number finite in fp32 but leaves the fp16 range of the checkpoint.
    config = recover_config(packed, corpus, tmp_path / "out", steps=3, lr=1e6, warmup_ratio=0.0)
    with pytest.raises(ValueError, match=r"step 1 of 3: the trained columns reach \S+, beyond fp16"):
        recover(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_eval_refuses_to_report_a_nan_perplexity(tiny_dir, text_file, tmp_path):
    model_dir = Path(shutil.copytree(tiny_dir, tmp_path / "nan-model"))
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    report = tmp_path / "eval.json"
    result = _cli("eval", "--model", model_dir, "--ppl", text_file, "--seqlen", "32", "--max-windows", "2",
                  "--json", report)
    _one_line_error(result, "perplexity", "is nan", "not a result")
    assert not report.exists()


# ----------------------------------------------------------------------------- one validator for every loader

def _rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _tensor(name: str, change):
    return lambda d: _rewrite(d / "model.safetensors", lambda t: t.update({f"{DOWN}.{name}": change(t[f"{DOWN}.{name}"])}))


def _qconfig(**changes):
    def damage(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"].update(changes)
        (directory / "config.json").write_text(json.dumps(config))
    return damage


def _model_config(**changes):
    def damage(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
    return damage


def _header(change):
    """Rewrite one header of model.safetensors in place (same length: compact JSON, space-padded)."""
    def damage(directory: Path) -> None:
        path = directory / "model.safetensors"
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        change(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= length
        path.write_bytes(data[:8] + text.ljust(length) + data[8 + length:])
    return damage


def _offsets(name, begin_at=None, shift=0):
    """Move a tensor's data offsets: to start at ``begin_at`` (same size), or by ``shift`` bytes."""
    def change(header):
        begin, end = header[f"{DOWN}.{name}"]["data_offsets"]
        start = begin + shift if begin_at is None else begin_at
        header[f"{DOWN}.{name}"]["data_offsets"] = [start, start + end - begin]
    return change


def _set(index, value):
    def change(t):
        t = t.clone()
        t.view(-1)[index] = value
        return t
    return change


# Damage -> the message every loader must give (the header cases of test_checkpoint come on top).
VALUE_CORRUPTIONS = {
    "salient_unsorted": (_tensor("salient_idx", lambda t: t.flip(0)), rf"tensor {DOWN}\.salient_idx must be sorted"),
    "salient_range": (_tensor("salient_idx", _set(-1, 160)), rf"tensor {DOWN}\.salient_idx must be sorted unique "
                                                             r"columns in \[0, 160\)"),
    "g_idx_range": (_tensor("g_idx", lambda t: torch.full_like(t, 99)), rf"tensor {DOWN}\.g_idx has values outside"),
    "g_idx_order": (_tensor("g_idx", lambda t: t.flip(0)), rf"tensor {DOWN}\.g_idx must be non-decreasing"),
    "g_idx_groups": (_tensor("g_idx", lambda t: torch.where(t == 1, 0, t)),
                     rf"tensor {DOWN}\.g_idx puts between 0 and 64 columns in a group"),
    "perm": (_tensor("perm", _set(1, 0)), rf"tensor {DOWN}\.perm and salient_idx must together name every input"),
    "nan_scales": (_tensor("scales", _set(3, float("nan"))), rf"tensor {DOWN}\.scales holds non-finite values"),
    "inf_salient_weight": (_tensor("salient_weight", _set(0, float("inf"))),
                           rf"tensor {DOWN}\.salient_weight holds non-finite values"),
    "bits": (_qconfig(bits=4), r"tensor \S+\.qweight has shape \[\d+, \d+\], expected"),
    "group_size": (_qconfig(group_size=16), r"\.scales has \d+ groups; \d+ quantized columns in groups of 16 make"),
    "sym": (_qconfig(sym=True), r"\.qzeros must all be 4 in a symmetric \(sym\) checkpoint"),
    # Checked before the model the config describes is built (a million layers took minutes and gigabytes).
    "million_layers": (_model_config(num_hidden_layers=1_000_000),
                       r"config\.json: num_hidden_layers is 1000000, but the weights hold 2 blocks under model\.layers"),
    "negative_vocab": (_model_config(vocab_size=-5), r"config\.json: vocab_size is -5; a size must be a count >= 0"),
    "million_experts": (_model_config(num_local_experts=10**6), r"num_local_experts is 1000000, more experts than"),
    "negative_offset": (_header(_offsets("scales", begin_at=-2)), rf"corrupt header entry for tensor {DOWN}\.scales"),
    "overlapping_offsets": (_header(_offsets("scales", shift=-2)), r"corrupt header: tensor \S+ starts at data byte \d+, "
                                                              r"which overlaps the tensor before it"),
}
ALL_CORRUPTIONS = {**{f"header-{case}": (lambda d, f=f, damage=damage: damage(d / f), message)
                      for case, (f, damage, message) in CORRUPTIONS.items()},
                   **VALUE_CORRUPTIONS}


def _error_of(loader: str, directory: Path) -> str:
    from transformers import AutoModelForCausalLM

    if loader == "info":
        result = _cli("info", directory)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        return result.output.removeprefix("Error: ").strip()
    with pytest.raises(ValueError) as err:
        load(directory) if loader == "quikft.load" else AutoModelForCausalLM.from_pretrained(directory)
    return str(err.value)


@pytest.mark.parametrize("case", sorted(ALL_CORRUPTIONS))
def test_every_loader_refuses_a_damaged_checkpoint_with_the_same_message(packed, tmp_path, case):
    target = Path(shutil.copytree(packed, tmp_path / "ckpt"))
    damage, message = ALL_CORRUPTIONS[case]
    damage(target)
    errors = {loader: _error_of(loader, target) for loader in ("quikft.load", "from_pretrained", "info")}
    assert re.search(message, errors["quikft.load"]), errors
    assert "\n" not in errors["quikft.load"]
    assert len(set(errors.values())) == 1, errors


def test_a_flipped_byte_is_named_by_info_verify(packed, tmp_path):
    target = Path(shutil.copytree(packed, tmp_path / "ckpt"))
    assert "sha256 of" in _cli("info", "--verify", target).output
    info = read_header(target / "model.safetensors")[f"{DOWN}.qweight"]
    with open(target / "model.safetensors", "r+b") as handle:
        handle.seek(info.offset + 7)
        byte = handle.read(1)
        handle.seek(info.offset + 7)
        handle.write(bytes([byte[0] ^ 0x10]))
    assert _cli("info", target).exit_code == 0  # every value is still plausible: only the checksum can tell
    _one_line_error(_cli("info", "--verify", target),
                    f"model.safetensors: tensor {DOWN}.qweight does not match its recorded sha256")
    with pytest.raises(ValueError, match=rf"tensor {DOWN}\.qweight does not match"):
        load(target, verify=True)


# ----------------------------------------------------------------------------- early checks

@pytest.mark.parametrize("yaml_text,fragment", [
    ("salient: many\n", "salient 'many' is neither a count (an integer >= 0) nor a fraction in (0, 1)"),
    ('nsamples: "8"\n', "setting nsamples must be an integer; got '8'"),
    ("group_size: 6.5\n", "setting group_size must be an integer; got 6.5"),
    ("bits: 4.0\n", "setting bits must be an integer; got 4.0"),
    ("bits: [4\n", ":2: invalid YAML"),
    ("sym: 1\n", "setting sym must be true or false"),
    ("metric: best\n", "unknown saliency metric 'best'"),
])
def test_bad_presets_are_one_line_errors_naming_the_key(tiny_dir, text_file, tmp_path, monkeypatch, yaml_text,
                                                        fragment):
    monkeypatch.setattr(quikft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml_text)
    result = _cli("quantize", "--model", tiny_dir, "--calib", text_file, "--config", preset, "--out", tmp_path / "run")
    _one_line_error(result, fragment, str(preset))
    assert not (tmp_path / "run").exists()


def test_seqlen_beyond_the_model_context_is_refused_before_loading(tiny_dir, text_file, packed, corpus, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(quikft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = _quantize_args(tiny_dir, text_file, tmp_path / "q")
    args[args.index("--seqlen") + 1] = "100000"
    _one_line_error(_cli(*args), "--seqlen 100000 exceeds the context", "(256 tokens)", "--seqlen 256 or less")
    args = _recover_args(packed, corpus, tmp_path / "r")
    args[args.index("--seqlen") + 1] = "100000"
    _one_line_error(_cli(*args), "--seqlen 100000 exceeds the context", "(256 tokens)")


def test_unknown_data_names_list_the_known_ones(tiny_dir, packed, corpus, tmp_path):
    result = _cli(*_quantize_args(tiny_dir, "c5", tmp_path / "q"))
    _one_line_error(result, "--calib 'c5' is neither a known dataset (alpaca, alpaca-gpt4, c4, ptb, wikitext2)")
    _one_line_error(_cli(*_recover_args(packed, {"text": "alpacca"}, tmp_path / "r")), "--data 'alpacca'")


def _custom_code_model(directory: Path, marker: Path) -> Path:
    directory.mkdir()
    code = (f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import PretrainedConfig\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'quikft-test-custom'\n")
    (directory / "configuration_evil.py").write_text(code)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "quikft-test-custom", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "configuration_evil.EvilConfig"}}))
    return directory


def test_custom_model_code_never_runs_without_trust_remote_code(tmp_path, text_file):
    marker = tmp_path / "ran"
    model = _custom_code_model(tmp_path / "custom", marker)
    # transformers would otherwise ask on stdin, and a "y" would run the model's code.
    result = _cli("eval", "--model", model, "--ppl", text_file, input="y\ny\n")
    _one_line_error(result, "ships its own Python code", "--trust-remote-code")
    assert not marker.exists()
    _one_line_error(_cli("generate", "--model", model, "hi", input="y\n"), "--trust-remote-code")
    assert not marker.exists()


# ----------------------------------------------------------------------------- names and layering

def test_pre_mode_keeps_the_preset_bits_and_salient_count(tiny_dir, corpus, tmp_path):
    preset = tmp_path / "w4.yaml"
    preset.write_text(f"bits: 4\nsalient: 6\ncalib: {corpus['text']}\nnsamples: 4\nseqlen: 32\ngroup_size: 32\n")
    config = recover_config(tiny_dir, corpus, tmp_path / "out", mode="pre", steps=1, quant_config=str(preset))
    report = recover(config, progress=False)
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qconfig["bits"], qconfig["salient"], report["config"]["noise_bits"]) == (4, 6, 4)
    assert qconfig["source_model"] == str(tiny_dir.resolve())


def test_checkpoints_record_the_scheme_not_the_job_and_kd_uses_the_recorded_source(tiny_dir, text_file, packed,
                                                                                   corpus, tmp_path):
    out = tmp_path / "run"
    assert _cli(*_quantize_args(tiny_dir, text_file, out, "--device", "cpu")).exit_code == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not {"out", "device", "model", "eval_windows", "batch_size", "overwrite"} & set(qconfig["settings"])
    assert qconfig["source_model"] == str(tiny_dir.resolve())
    report = recover(recover_config(packed, corpus, tmp_path / "kd", loss="kd", steps=1), progress=False)
    assert report["config"]["teacher"] == str(tiny_dir) == report["source_model"]


def test_recovery_choices_are_not_dispatched_on_strings():
    """Modes are objects chosen once (quikft.recovery.MODES), losses and sharding enums: no module compares
    against the name of a mode, a loss or a sharding choice."""
    choices = {*MODES, *(loss.value for loss in Loss), *(choice.value for choice in Sharding)}
    for path in (REPO / "quikft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not set(names) & choices, f"{path.name}:{node.lineno} compares a recovery choice's name"


def test_ci_runs_ruff_before_the_tests_and_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    command = "pip install torch==2.13.0 && pip install -e \".[dev]\" && QUIKFT_DATA=../shared/data python -m pytest -q"
    assert command in readme and command in ci
    assert "ruff check quikft tests tools" in ci and ci.index("ruff check") < ci.index("pytest")
