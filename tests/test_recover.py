"""The recover job on the tiny model: training data, modes, output checkpoints, resume, CLI, 2 processes."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import accelerate_launch, launch_errors, recover_config
from safetensors.torch import load_file

import quikft.recovery.job
from quikft.checkpoint import load, stored_bits
from quikft.cli import main
from quikft.data import DataError
from quikft.models import load_model, load_tokenizer
from quikft.nn import QuikLinear
from quikft.recovery import RecoverConfig, recover
from quikft.recovery.data import IGNORE, TrainingMixture, encode_instruction
from quikft.recovery.session import TrainingSession

QUIK_KEYS = ("qweight", "qzeros", "scales", "g_idx", "salient_idx")


def _config(model, corpus, tmp_path, **changes):
    return recover_config(model, corpus, tmp_path / "out", **changes)


# ----------------------------------------------------------------------------- data

def test_instruction_labels_cover_the_response_only(tiny_dir):
    tokenizer = load_tokenizer(str(tiny_dir))
    ids, labels = encode_instruction(tokenizer, {"instruction": "Name a colour.", "input": "", "output": "Blue."})
    assert len(ids) == len(labels)
    learned = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(learned).startswith("Blue.")
    assert learned[-1] == tokenizer.eos_token_id
    first = labels.index(learned[0])
    assert "Name a colour." in tokenizer.decode(ids[:first]) and all(t == IGNORE for t in labels[:first])


@pytest.mark.slow
def test_chat_template_masks_prompt_and_template_tokens():
    tokenizer = load_tokenizer(None)  # the default model's real chat template
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]}
    ids, labels = encode_instruction(tokenizer, record)
    learned = tokenizer.decode([t for t in labels if t != IGNORE])
    assert "Hello!" in learned and "Goodbye!" in learned and "Hi" not in learned and "Bye<" not in learned


def test_mixture_rows_are_round_robin_deterministic_and_full(tiny_dir, corpus):
    tokenizer = load_tokenizer(str(tiny_dir))
    mixture = TrainingMixture(tokenizer, [corpus["instructions"], corpus["text"]], seqlen=32, seed=0)
    again = TrainingMixture(tokenizer, [corpus["instructions"], corpus["text"]], seqlen=32, seed=0)
    for i in range(6):
        assert torch.equal(mixture.row(i)[0], again.row(i)[0])
        assert mixture.row(i)[0].shape == (32,)
    text_rows = mixture.row(1)[1]
    assert bool((text_rows != IGNORE).all())  # plain text: every token has a label
    assert bool((mixture.row(0)[1] == IGNORE).any())  # instructions: prompts masked
    batch = mixture.batch([0, 1, 2])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 32)


def test_bad_training_data_gets_one_line_errors(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_dir))
    short = tmp_path / "short.txt"
    short.write_text("tiny\n")
    with pytest.raises(DataError, match="fewer than one row"):
        TrainingMixture(tokenizer, [str(short)], seqlen=64)
    with pytest.raises(DataError, match="no training data"):
        TrainingMixture(tokenizer, [], seqlen=64)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        TrainingMixture(tokenizer, [str(empty)], seqlen=8)


# ----------------------------------------------------------------------------- post / salient-ft

def _quik_tensors(path):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] in (*QUIK_KEYS, "salient_weight")}


def test_post_mode_trains_salient_columns_and_keeps_codes_bit_identical(packed, corpus, tmp_path):
    report = recover(_config(packed, corpus, tmp_path, mode="post"), progress=False)
    before, after = _quik_tensors(packed), _quik_tensors(report["out"])
    assert before.keys() == after.keys()
    changed = 0
    for name, tensor in before.items():
        if name.endswith("salient_weight"):
            changed += not torch.equal(tensor, after[name])
        else:
            assert torch.equal(tensor, after[name]), name
    assert changed == sum(1 for n in before if n.endswith("salient_weight"))
    assert report["config"]["noise"] and report["config"]["noise_bits"] == 4
    assert report["bits"] == 3 and report["salient"] == 8  # the checkpoint's, not the pre-mode setting
    assert report["bits_per_weight"] == stored_bits(packed).to_dict()  # new salient values, same storage
    assert report["trainable_params"] == sum(t.numel() for n, t in before.items() if n.endswith("salient_weight"))
    assert len(report["loss_curve"]) == 4
    assert not os.path.exists(f"{report['out']}.train-state")
    model = load(report["out"])  # the output is a loadable packed checkpoint
    assert any(isinstance(m, QuikLinear) for m in model.modules())


def test_a_few_steps_lower_the_training_loss(packed, corpus, tmp_path):
    config = _config(packed, corpus, tmp_path, mode="salient-ft", data=(corpus["text"],), steps=12, lr=3e-3,
                     warmup_ratio=0.0)
    tokenizer = load_tokenizer(str(packed))
    batch = TrainingMixture(tokenizer, config.data, config.seqlen, config.seed).batch([0, 1, 2, 3])

    def loss_of(path):
        model, _ = load_model(str(path))
        with torch.no_grad():
            return model(**batch).loss.item()

    report = recover(config, progress=False)
    assert report["config"]["noise"] is False
    assert loss_of(report["out"]) < loss_of(packed) - 0.05


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(packed, corpus, tmp_path, monkeypatch):
    straight = recover(_config(packed, corpus, tmp_path / "a", mode="post", steps=6), progress=False)
    config = _config(packed, corpus, tmp_path / "b", mode="post", steps=6, save_every=2)
    real_save = TrainingSession.save
    saves = []

    def crash_after_second_save(session, step):
        real_save(session, step)
        saves.append(step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingSession, "save", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        recover(config, progress=False)
    monkeypatch.setattr(TrainingSession, "save", real_save)
    assert not os.path.exists(config.out)  # nothing half-written
    with pytest.raises(FileExistsError, match="--resume"):
        recover(config, progress=False)
    resumed = recover(_config(packed, corpus, tmp_path / "b", mode="post", steps=6, save_every=2, resume=True),
                      progress=False)
    a, b = load_file(os.path.join(straight["out"], "model.safetensors")), load_file(
        os.path.join(resumed["out"], "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [p["loss"] for p in resumed["loss_curve"]] == [p["loss"] for p in straight["loss_curve"]]


def test_resume_refuses_changed_settings(packed, corpus, tmp_path, monkeypatch):
    config = _config(packed, corpus, tmp_path, mode="post", steps=4, save_every=2)
    monkeypatch.setattr(quikft.recovery.job, "finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        recover(config, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lr"):
        recover(_config(packed, corpus, tmp_path, mode="post", steps=4, save_every=2, lr=5e-4, resume=True),
                progress=False)


def test_recovered_checkpoint_loads_with_from_pretrained_and_evaluates_the_same(packed, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    report = recover(_config(packed, corpus, tmp_path, mode="post", steps=2), progress=False)
    ids = torch.randint(0, 300, (1, 40))
    ours = load(report["out"])
    theirs = AutoModelForCausalLM.from_pretrained(report["out"])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_kd_loss_trains_against_the_fp_teacher(packed, corpus, tmp_path, tiny_dir):
    report = recover(_config(packed, corpus, tmp_path, mode="post", loss="kd", teacher=str(tiny_dir), steps=2),
                     progress=False)
    losses = [p["loss"] for p in report["loss_curve"]]
    assert all(loss >= 0 and loss == loss for loss in losses)


def test_lora_baseline_trains_adapters_only(packed, corpus, tmp_path):
    pytest.importorskip("peft")
    from quikft.integrations.peft import QuikLoraLinear, load_lora

    report = recover(_config(packed, corpus, tmp_path, mode="lora", lora_rank=4, steps=2, lr=1e-2), progress=False)
    assert os.path.exists(os.path.join(report["out"], "adapter", "adapter_config.json"))
    assert report["trainable_params"] > 0 and report["config"]["noise"] is False
    assert report["bits_per_weight"] is None  # the adapter is stored apart from the packed base
    model = load_lora(Path(report["out"]) / "adapter")  # the adapter on top of the packed input
    assert sum(isinstance(m, QuikLoraLinear) for m in model.modules()) == sum(
        isinstance(m, QuikLinear) for m in load(packed).modules())
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        plain = load(packed, dtype=torch.float32)(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-4)


# ----------------------------------------------------------------------------- pre

def test_pre_mode_trains_the_fp_model_then_quantizes_with_its_salient_sets(tiny_dir, corpus, tmp_path):
    config = _config(tiny_dir, corpus, tmp_path, mode="pre", bits=4, salient="10%", steps=2,
                     quant_config=None)
    config.quant_config = str(tmp_path / "q.yaml")
    (tmp_path / "q.yaml").write_text(f"calib: {corpus['text']}\nnsamples: 4\nseqlen: 32\ngroup_size: 32\n")
    report = recover(config, progress=False)
    assert report["config"]["noise_bits"] == 4  # pre mode: noise at the target bit-width
    qconfig = json.loads(Path(report["out"], "config.json").read_text())["quantization_config"]
    assert qconfig["bits"] == 4 and qconfig["salient"] == 0.1 and report["bits"] == 4
    assert report["salient"] == 0.1 and report["bits_per_weight"] == stored_bits(report["out"]).to_dict()
    tensors = load_file(os.path.join(report["out"], "model.safetensors"))
    indices = load_file(os.path.join(report["out"], "salient_indices.safetensors"))
    # the fraction resolved per layer: round(0.1 * 64) and round(0.1 * 160) columns
    assert {idx.numel() for idx in indices.values()} == {6, 16}
    for name, idx in indices.items():
        assert torch.equal(tensors[f"{name}.salient_idx"], idx.to(torch.int32))
    load(report["out"])


def test_modes_refuse_the_wrong_kind_of_input(packed, tiny_dir, corpus, tmp_path):
    with pytest.raises(ValueError, match="packed checkpoint"):
        recover(_config(tiny_dir, corpus, tmp_path, mode="post"), progress=False)
    with pytest.raises(ValueError, match="full-precision"):
        recover(_config(packed, corpus, tmp_path, mode="pre"), progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        RecoverConfig(mode="full")
    with pytest.raises(ValueError, match="bits"):
        RecoverConfig(noise_bits=5)


def test_a_mode_is_one_registered_class(packed, corpus, tmp_path, monkeypatch):
    """The CLI's choices, the config's check and the report's label come from the registries: a new mode
    is a class added to MODES (here: salient-ft under another name and label)."""
    from quikft.eval.report import recover_rows
    from quikft.recovery.loss import Loss
    from quikft.recovery.modes import MODES, SalientFtMode
    from quikft.recovery.sharding import Sharding

    choices = {param.name: list(param.type.choices) for param in main.commands["recover"].params
               if hasattr(param.type, "choices")}
    assert choices["mode"] == list(MODES) and choices["loss"] == [loss.value for loss in Loss]
    assert choices["sharding"] == [choice.value for choice in Sharding]

    class ToyMode(SalientFtMode):
        name, summary, label = "toy", "a test mode", "Toy FT"

    with pytest.raises(ValueError, match="unknown mode 'toy'"):
        RecoverConfig(mode="toy")
    monkeypatch.setitem(MODES, "toy", ToyMode())
    report = recover(_config(packed, corpus, tmp_path, mode="toy", steps=1), progress=False)
    assert report["config"]["mode"] == "toy" and report["config"]["noise"] is False
    assert recover_rows(report, "run")[0].method == "Toy FT"


def test_cli_recover_and_one_line_errors(packed, corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-out"
    args = ["recover", "--model", str(packed), "--data", corpus["instructions"], "--data", corpus["text"],
            "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--eval-windows", "0", "--fp32",
            "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "recovered (post, noise 4, float32)" in result.output
    assert "tok/s=" in result.output  # the progress bar shows the speed, so a slow setting shows at once
    assert json.loads((out / "recover_report.json").read_text())["config"]["data"] == [corpus["instructions"],
                                                                                     corpus["text"]]
    bad = runner.invoke(main, ["recover", "--model", str(packed), "--steps", "0", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "steps must be positive" in bad.output and "Traceback" not in bad.output


def _cpu_capability(monkeypatch, capability: str, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_recover_picks_its_compute_dtype_from_the_hardware_and_reports_why(packed, corpus, tmp_path, monkeypatch):
    runs = {}
    for name, capability, native in (("avx2", "AVX2", False), ("avx512_bf16", "AVX512", True)):
        with monkeypatch.context() as patch:
            _cpu_capability(patch, capability, native)
            runs[name] = recover(_config(packed, corpus, tmp_path / name, bf16=None, dtype="auto", steps=2),
                                 progress=False)
    fp32 = recover(_config(packed, corpus, tmp_path / "fp32", bf16=False, steps=2), progress=False)
    avx2, native = runs["avx2"]["compute_dtype"], runs["avx512_bf16"]["compute_dtype"]
    assert avx2["dtype"] == "float32" and "cpu capability AVX2" in avx2["reason"] and "no native bf16" in avx2["reason"]
    assert native["dtype"] == "bfloat16" and "AVX512 with avx512_bf16" in native["reason"]
    assert runs["avx2"]["config"]["compute_dtype"] == "float32"
    # the choice drives the computation: AVX2's auto is exactly the --fp32 run, the native one differs
    losses = {name: [p["loss"] for p in report["loss_curve"]] for name, report in (*runs.items(), ("fp32", fp32))}
    assert losses["avx2"] == losses["fp32"] != losses["avx512_bf16"]
    with monkeypatch.context() as patch:
        _cpu_capability(patch, "AVX2", False)
        forced = recover(_config(packed, corpus, tmp_path / "forced", bf16=True, dtype="auto", steps=1),
                         progress=False)
    assert forced["compute_dtype"]["dtype"] == "bfloat16"
    assert forced["compute_dtype"]["reason"].startswith("--bf16 requested; cpu capability AVX2")
    named = recover(_config(packed, corpus, tmp_path / "named", bf16=None, dtype="fp32", steps=1), progress=False)
    assert named["compute_dtype"]["dtype"] == "float32" and named["compute_dtype"]["reason"].startswith("--dtype fp32")


@pytest.mark.slow
def test_two_process_data_parallel_run_completes_and_its_checkpoint_loads(packed, corpus, tmp_path):
    assert shutil.which("accelerate"), "the accelerate CLI comes with the accelerate dependency"
    out = tmp_path / "ddp"
    cmd = accelerate_launch(2, "-m", "quikft.cli", "recover", "--model", str(packed), "--data", corpus["instructions"],
                            "--data", corpus["text"], "--steps", "3", "--batch-size", "2", "--seqlen", "32",
                            "--eval-windows", "0", "--fp32", "--out", str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, launch_errors(done.stderr)
    report = json.loads((out / "recover_report.json").read_text())
    assert len(report["loss_curve"]) == 3 and report["processes"] == 2
    load(out)


def test_recover_presets_build_valid_configs():
    from quikft.config import build_config

    root = Path(__file__).resolve().parents[1] / "configs"
    default = build_config(RecoverConfig, root / "gift-sw.yaml")
    assert default.to_dict() == RecoverConfig().to_dict()  # the preset spells out the defaults
    paper = build_config(RecoverConfig, root / "gift-sw-paper.yaml")
    assert paper.steps == 500 and paper.batch_size * paper.grad_accum == 128
