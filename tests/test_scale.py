"""Quantizing block by block from the checkpoint: the streamed job equals the in-memory quantization
bit for bit, keeps bf16 models in bf16, offloads activations, resumes after SIGKILL and survives a
full disk without losing its state."""

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from families import build_family
from safetensors.torch import load_file, save_file

from quikft.checkpoint import load, save_packed
from quikft.config import QuantizeJob, from_settings
from quikft.data import calibration_windows
from quikft.eval.ppl import quick_ppl
from quikft.format import shards
from quikft.jobs.quantize import quantize, streaming
from quikft.jobs.quantize.state import QuantizeState, QuantizeStateError, state_dir_for
from quikft.jobs.quantize.streaming import round_floating
from quikft.models import load_model
from quikft.quant import budget as budget_module
from quikft.quant.activations import ActivationStore
from quikft.quant.model import quantize_model

REPO = Path(__file__).resolve().parents[1]


def _saved(tmp_path_factory, tokenizer, family="llama", dtype=torch.float32, **changes):
    directory = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}")
    model = build_family(family, tokenizer, **changes).to(dtype)
    model.save_pretrained(directory, max_shard_size="100KB")  # several shards, as big checkpoints have
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, tokenizer, num_hidden_layers=4)


def _config(model_dir, text_corpus, out, **changes):
    """A quantize job of the tiny model (flat settings, routed to the scheme and the job)."""
    settings = dict(model=str(model_dir), bits=3, salient=8, group_size=32, calib=str(text_corpus), nsamples=10,
                    seqlen=32, batch_size=4, clip_search=False, expert_min_tokens=4, eval_windows=0, device="cpu",
                    out=str(out))
    return from_settings(QuantizeJob, {**settings, **changes})


def _ppl(model, tokenizer, job) -> float:
    return quick_ppl(model, tokenizer, job, "x")["ppl"]


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in glob.glob(f"{directory}/model*.safetensors"):
        out.update(load_file(file))
    return out


def _assert_same_tensors(a, b):
    a, b = _tensors(a), _tensors(b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _in_memory(job, tmp_path):
    """The reference: the whole model in memory, quantize_model + save_packed."""
    model, tokenizer = load_model(job.model, dtype=torch.float32)
    scheme = job.quant
    calib = calibration_windows(tokenizer, scheme.calib, scheme.nsamples, scheme.seqlen, scheme.seed)
    quantized = quantize_model(model, calib, scheme, progress=False, device=job.device, batch_size=job.batch_size)
    save_packed(model, tokenizer, quantized, tmp_path / "memory", scheme, source_model=job.model)
    return model, tokenizer, quantized


def test_streamed_job_equals_in_memory_quantization_and_evaluation(llama_dir, text_corpus, tmp_path, shared_data,
                                                                  monkeypatch, single_thread):
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    config = _config(llama_dir, text_corpus, tmp_path / "streamed", eval_windows=2, eval_seqlen=64)
    report = quantize(config, progress=False)
    assert report["loading"] == "streamed block by block"
    model, tokenizer, quantized = _in_memory(config, tmp_path)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    assert report["ppl"]["ppl"] == _ppl(model, tokenizer, config)
    round_floating(model, torch.bfloat16, skip={f"{n}.{p}" for n in quantized.results for p in ("weight", "bias")})
    assert report["ppl_saved"]["ppl"] == _ppl(model, tokenizer, config)
    fp_model, _ = load_model(str(llama_dir), dtype=torch.float32)
    assert report["fp_ppl"]["ppl"] == _ppl(fp_model, tokenizer, config)
    assert report["layers"] == [dict(vars(layer), seconds=r["seconds"]) for layer, r in
                                zip(quantized.layers, report["layers"], strict=True)]
    assert not state_dir_for(tmp_path / "streamed").exists()  # the state goes once the output is complete
    # Under the format's shard size the output is one file, as save_pretrained writes it.
    assert sorted(p.name for p in (tmp_path / "streamed").glob("model*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "streamed" / "model.safetensors.index.json").exists()


def test_streamed_job_over_the_shard_size_writes_shards_of_the_same_tensors(llama_dir, tokenizer, text_corpus,
                                                                            tmp_path, monkeypatch):
    """Above the shard size the streamed output is save_pretrained's shards plus an index, with the
    tensors of the one-file output bit for bit; every loader reads both alike."""
    quantize(_config(llama_dir, text_corpus, tmp_path / "one"), progress=False)
    monkeypatch.setattr(shards, "MAX_SHARD_SIZE", "60KB")
    quantize(_config(llama_dir, text_corpus, tmp_path / "sharded"), progress=False)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    _assert_same_tensors(tmp_path / "one", tmp_path / "sharded")
    ids = calibration_windows(tokenizer, str(text_corpus), 2, 32, 1)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "one", dtype=torch.float32, kernel="torch")(input_ids=ids).logits,
                           load(tmp_path / "sharded", dtype=torch.float32, kernel="torch")(input_ids=ids).logits)


def test_streamed_saved_ppl_keeps_packed_biases(tmp_path_factory, tokenizer, text_corpus, tmp_path, shared_data,
                                                monkeypatch):
    """Qwen2's q/k/v biases stay fp32 in the packed layers: the as-saved stream must not round them."""
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    directory = _saved(tmp_path_factory, tokenizer, "qwen2")
    config = _config(directory, text_corpus, tmp_path / "streamed", eval_windows=1, eval_seqlen=64)
    report = quantize(config, progress=False)
    model, tokenizer, quantized = _in_memory(config, tmp_path)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    round_floating(model, torch.bfloat16, skip={f"{n}.{p}" for n in quantized.results for p in ("weight", "bias")})
    assert report["ppl_saved"]["ppl"] == _ppl(model, tokenizer, config)


@pytest.mark.parametrize("family", ["gemma2", "opt", "falcon", "mixtral", "qwen2_moe"])
def test_streamed_families_equal_in_memory(family, tmp_path_factory, tokenizer, text_corpus, tmp_path, single_thread):
    directory = _saved(tmp_path_factory, tokenizer, family)
    config = _config(directory, text_corpus, tmp_path / "streamed")
    assert quantize(config, progress=False)["loading"] == "streamed block by block"
    _in_memory(config, tmp_path)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    ids = calibration_windows(tokenizer, str(text_corpus), 2, 32, 1)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "streamed", dtype=torch.float32)(input_ids=ids).logits,
                           load(tmp_path / "memory", dtype=torch.float32)(input_ids=ids).logits)


def test_a_streamed_moe_budget_job_reads_each_block_again_for_every_walk(tmp_path_factory, tokenizer, text_corpus,
                                                                        tmp_path, single_thread):
    """--target-bpw walks the blocks three times (sensitivity, measurement, quantization); a walk unfuses a
    block's experts, and releasing the block puts them back in the stored layout, so the next walk reads them
    again (it once failed: no stored tensor provides the unfused experts' weights)."""
    directory = _saved(tmp_path_factory, tokenizer, "mixtral")
    config = _config(directory, text_corpus, tmp_path / "streamed", target_bpw=4.5)
    assert quantize(config, progress=False)["loading"] == "streamed block by block"
    _in_memory(config, tmp_path)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_head_quantization_equals_in_memory(tied, tmp_path_factory, tokenizer, text_corpus, tmp_path, shared_data,
                                                     monkeypatch):
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    directory = _saved(tmp_path_factory, tokenizer, tie_word_embeddings=tied)
    config = _config(directory, text_corpus, tmp_path / "streamed", quantize_lm_head=True, eval_windows=1, eval_seqlen=64)
    report = quantize(config, progress=False)
    assert report["head"] == "lm_head" and report["untied_head"] is tied
    model, tokenizer, _ = _in_memory(config, tmp_path)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    assert report["ppl"]["ppl"] == _ppl(model, tokenizer, config)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["tie_word_embeddings"] is False


def test_bf16_checkpoint_stays_bf16_and_offload_modes_agree(tmp_path_factory, tokenizer, text_corpus, tmp_path):
    directory = _saved(tmp_path_factory, tokenizer, dtype=torch.bfloat16, num_hidden_layers=3)
    seen = []
    original = streaming.StreamingStep.before

    def record_dtype(self, block):
        seen.append(next(block.module.parameters()).dtype)
        return original(self, block)

    streaming.StreamingStep.before = record_dtype
    try:
        for mode in ("none", "cpu", "disk"):
            quantize(_config(directory, text_corpus, tmp_path / mode, offload_activations=mode), progress=False)
    finally:
        streaming.StreamingStep.before = original
    assert set(seen) == {torch.bfloat16}
    _assert_same_tensors(tmp_path / "none", tmp_path / "cpu")
    _assert_same_tensors(tmp_path / "none", tmp_path / "disk")
    assert load(tmp_path / "disk", dtype=torch.float32) is not None


KILLER = textwrap.dedent("""
    import os, signal, sys
    from quikft.config import QuantizeJob, from_settings
    from quikft.jobs.quantize import state, streaming
    from quikft.jobs.quantize import quantize

    kill_at = int(sys.argv[1])
    commits = []
    real_commit, real_save = state.QuantizeState.commit, streaming.save_weights

    def commit(self, next_block, *args, **kwargs):
        real_commit(self, next_block, *args, **kwargs)
        commits.append(next_block)

    def save(tensors, path):
        # SIGKILL in the middle of writing the next block's file: part of it written, nothing committed.
        if len(commits) == kill_at:
            path.write_bytes(b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, path)

    state.QuantizeState.commit = commit
    streaming.save_weights = save
    quantize(from_settings(QuantizeJob, __import__("json").loads(sys.argv[2])), progress=False)
""")


def test_resume_after_sigkill_is_bit_identical(llama_dir, text_corpus, tmp_path):
    straight = _config(llama_dir, text_corpus, tmp_path / "straight")
    quantize(straight, progress=False)
    killed = _config(llama_dir, text_corpus, tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", KILLER, "2", json.dumps(killed.to_dict())], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not (tmp_path / "killed").exists()  # no complete-looking output
    progress = json.loads((state_dir_for(tmp_path / "killed") / "progress.json").read_text())
    assert progress["next_block"] == 2
    with pytest.raises(QuantizeStateError, match="holds an interrupted quantize .2 of 4 blocks done.; rerun with --resume"):
        quantize(killed, progress=False)
    with pytest.raises(QuantizeStateError, match="used bits=3, this one bits=4"):
        quantize(_config(llama_dir, text_corpus, tmp_path / "killed", bits=4, resume=True), progress=False)
    report = quantize(_config(llama_dir, text_corpus, tmp_path / "killed", resume=True), progress=False)
    assert report["resumed_from_block"] == 2 and report["state_peak_bytes"] > 0
    _assert_same_tensors(tmp_path / "straight", tmp_path / "killed")
    assert not state_dir_for(tmp_path / "killed").exists()
    with pytest.raises(QuantizeStateError, match="no interrupted quantize"):
        quantize(_config(llama_dir, text_corpus, tmp_path / "again", resume=True), progress=False)


def test_resume_refuses_changed_settings_and_warns_on_a_changed_thread_count(tmp_path):
    saved = {"bits": 3, "threads": 1, "transformers": "5.0"}
    _interrupted_state(tmp_path / "out", saved, blocks=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused resume does not also warn about the thread count
        with pytest.raises(QuantizeStateError, match="used transformers='5.0', this one transformers='5.1'; rerun"):
            QuantizeState.begin(tmp_path / "out", {**saved, "transformers": "5.1", "threads": 2}, resume=True)
    with pytest.warns(UserWarning, match="used threads=1, this one threads=2; .* OMP_NUM_THREADS=1 for a bit-identical"):
        resumed = QuantizeState.begin(tmp_path / "out", {**saved, "threads": 2}, resume=True)
    assert resumed.next_block == 1


def _interrupted_state(out: Path, fingerprint: dict, blocks: int) -> QuantizeState:
    """The state of a job interrupted after ``blocks`` of 4 blocks, each with a shard and activations."""
    state = QuantizeState.begin(out, fingerprint, resume=False)
    store = ActivationStore("none", "cpu")
    store.append(torch.arange(6.0))
    for index in range(blocks):
        shard = state.blocks_dir / f"block-{index:05d}.safetensors"
        save_file({"w": torch.full((4,), float(index))}, shard)
        state.commit(index + 1, {"calibration": store}, {"blocks": 4}, [shard])
    state.release()
    return state


def _swap(state: QuantizeState, victim: Path) -> None:
    shard = state.blocks_dir / "block-00000.safetensors"
    shard.write_bytes((state.blocks_dir / "block-00001.safetensors").read_bytes())


def _truncate(state: QuantizeState, victim: Path) -> None:
    shard = state.blocks_dir / "block-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])


def _link_shard(state: QuantizeState, victim: Path) -> None:
    shard = state.blocks_dir / "block-00000.safetensors"
    victim.write_bytes(shard.read_bytes())  # the same bytes: only the link gives it away
    victim.chmod(0o600)
    shard.unlink()
    shard.symlink_to(victim)


def _activation(change):
    def damage(state: QuantizeState, victim: Path) -> None:
        batch = state.directory / "activations-00002" / "calibration" / "00000.safetensors"
        change(batch, victim)
    return damage


def _link_batch(batch: Path, victim: Path) -> None:
    victim.write_bytes(batch.read_bytes())
    batch.unlink()
    batch.symlink_to(victim)


STATE_DAMAGE = {
    "swapped_shard": (_swap, r"block-00000\.safetensors does not match its recorded sha256"),
    "truncated_shard": (_truncate, r"block-00001\.safetensors does not match its recorded sha256"),
    "missing_shard": (lambda state, victim: (state.blocks_dir / "block-00001.safetensors").unlink(),
                      r"block-00001\.safetensors is missing"),
    "linked_shard": (_link_shard, r"block-00000\.safetensors is not a regular file"),
    "truncated_activations": (_activation(lambda batch, victim: batch.write_bytes(batch.read_bytes()[:-8])),
                              r"calibration/00000\.safetensors' is not as this state wrote it"),
    "linked_activations": (_activation(_link_batch), r"calibration/00000\.safetensors' is not as this state wrote"),
    "extra_activations": (_activation(lambda batch, victim: batch.with_name("00001.safetensors").write_bytes(b"x")),
                          r"calibration/00001\.safetensors' is not as this state wrote it"),
    "no_checksums": (lambda state, victim: _edit_progress(state, lambda p: p.pop("shards")),
                     r"no checksums for the 2 finished blocks"),
    "stale_activations": (lambda state, victim: _edit_progress(state, lambda p: p.update(next_block=1)),
                          r"names activations 'activations-00002' for block 1, not activations-00001"),
}


def _edit_progress(state: QuantizeState, change) -> None:
    progress = json.loads((state.directory / "progress.json").read_text())
    change(progress)
    (state.directory / "progress.json").write_text(json.dumps(progress))


@pytest.mark.parametrize("case", sorted(STATE_DAMAGE))
def test_resume_refuses_a_state_whose_files_changed_before_reading_them(tmp_path, case):
    """A resume is refused before any quantization when a finished block's shard or the activations
    are not as the interrupted run wrote them; nothing outside the state is touched (a linked file's
    mode stays 0600: the output's chmod never follows a link)."""
    state = _interrupted_state(tmp_path / "out", {"bits": 3}, blocks=2)
    victim = tmp_path / "victim.bin"
    damage, message = STATE_DAMAGE[case]
    damage(state, victim)
    before = victim.read_bytes() if victim.exists() else None
    with pytest.raises(QuantizeStateError, match=message) as err:
        QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=True)
    assert "the quantize state is inconsistent; delete" in str(err.value) and "\n" not in str(err.value)
    if before is not None:
        assert victim.read_bytes() == before and victim.stat().st_mode & 0o777 in (0o600, 0o644)
    assert not (tmp_path / "out").exists()


def test_an_intact_state_resumes_and_a_finished_runs_leftover_is_removed(tmp_path):
    _interrupted_state(tmp_path / "out", {"bits": 3}, blocks=2)
    resumed = QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=True)
    assert resumed.next_block == 2
    resumed.release()
    # a run killed after renaming its complete output into place, before removing its state
    finished = _interrupted_state(tmp_path / "done", {"bits": 3}, blocks=4)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "quantize_report.json").write_text("{}")
    fresh = QuantizeState.begin(tmp_path / "done", {"bits": 3}, resume=False)
    assert fresh.next_block == 0 and not list(fresh.blocks_dir.iterdir())
    fresh.release()
    # an output older than the state is a previous run's: the finished blocks are kept for --resume
    (tmp_path / "older").mkdir()
    _interrupted_state(tmp_path / "older", {"bits": 3}, blocks=4)
    with pytest.raises(QuantizeStateError, match="holds an interrupted quantize .4 of 4 blocks done.; rerun with"):
        QuantizeState.begin(tmp_path / "older", {"bits": 3}, resume=False)
    assert finished.directory.exists()


@pytest.mark.parametrize("activations", ["{victim}", "../victim", "activations-00002", "activations-00001-link"])
def test_resume_refuses_a_state_that_names_anything_but_its_own_activations(tmp_path, activations):
    """A progress file is data, never a path: a resume that would read or delete a directory outside
    the state (or another block's activations, or through a link) is refused before anything is touched."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    state = QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=False)
    state.release()  # that job was interrupted
    (state.directory / "activations-00001-link").symlink_to(victim)
    (state.directory / "activations-00002").mkdir()
    name = activations.format(victim=victim)
    progress = {"next_block": 1, "blocks": 4, "activations": name}
    (state.directory / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(QuantizeStateError, match="the quantize state is inconsistent; delete .* to start over") as err:
        QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=True)
    assert "\n" not in str(err.value) and len(str(err.value)) < 1024
    assert (victim / "precious.txt").read_text() == "keep me"
    # a link in place of the right name is refused too
    (state.directory / "activations-00001").symlink_to(victim)
    (state.directory / "progress.json").write_text(json.dumps({**progress, "activations": "activations-00001"}))
    with pytest.raises(QuantizeStateError, match="is not a directory of this state"):
        QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=True)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_second_writer_of_one_output_is_refused_at_once(tmp_path):
    import time

    first = QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=False)
    (first.directory / "blocks" / "block-00000.safetensors").write_bytes(b"first run's block")
    began = time.perf_counter()
    with pytest.raises(QuantizeStateError, match=r"out is being written by another quantize \(pid \d+\); wait"):
        QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=False)
    assert time.perf_counter() - began < 1
    assert (first.directory / "blocks" / "block-00000.safetensors").read_bytes() == b"first run's block"
    first.release()  # the first job ends, and leaves no lock file behind
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())
    QuantizeState.begin(tmp_path / "out", {"bits": 3}, resume=False).release()


def test_full_disk_fails_in_one_line_and_keeps_the_state(llama_dir, text_corpus, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from quikft.cli import main

    real_save = streaming.save_weights
    calls = []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 5:  # the third block's shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path)

    monkeypatch.setattr(streaming, "save_weights", full_disk)
    out = tmp_path / "out"
    args = ["quantize", "--model", str(llama_dir), "--calib", str(text_corpus), "--nsamples", "10", "--seqlen", "32",
            "--salient", "8", "--group-size", "32", "--no-clip-search", "--eval-windows", "0", "--device", "cpu",
            "--batch-size", "4", "--expert-min-tokens", "4", "--out", str(out)]
    failed = CliRunner().invoke(main, args)
    error = failed.output.strip().splitlines()[-1]  # after the progress bars
    assert failed.exit_code == 1 and error.startswith("Error: cannot write") and "Traceback" not in failed.output
    assert "No space left on device" in error and "--resume" in error
    assert not out.exists() and not list(tmp_path.glob(".out*partial"))
    progress = json.loads((state_dir_for(out) / "progress.json").read_text())
    assert progress["next_block"] == 2
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    quantize(_config(llama_dir, text_corpus, tmp_path / "straight"), progress=False)
    _assert_same_tensors(tmp_path / "straight", out)


def test_checkpoint_that_cannot_stream_loads_whole_and_says_so(tokenizer, text_corpus, tmp_path):
    """A checkpoint lacking a tensor (transformers initializes it) cannot stream: the model is loaded
    whole, the report says why, and the output is what the in-memory path writes."""
    from safetensors.torch import save_file

    directory = tmp_path / "model"
    model = build_family("llama", tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = _config(directory, text_corpus, tmp_path / "out")
    report = quantize(config, progress=False)
    assert report["loading"] == ("whole model in memory: no stored tensor (under any name transformers maps) "
                                 "provides model.norm.weight")
    _in_memory(config, tmp_path)
    _assert_same_tensors(tmp_path / "out", tmp_path / "memory")


def test_the_fingerprint_sees_weights_changed_in_place(llama_dir, text_corpus, tmp_path):
    """A resume must not stitch blocks of two different models: weights re-saved into the same directory
    with the same shapes change the fingerprint, another spelling of the same path does not."""
    import shutil

    from safetensors.torch import save_file

    from quikft.jobs.quantize.job import fingerprint
    from quikft.jobs.quantize.weights import CheckpointWeights

    model = shutil.copytree(llama_dir, tmp_path / "model")
    job = _config(model, text_corpus, tmp_path / "out")
    before = fingerprint(job, CheckpointWeights(model))
    respelled = _config(tmp_path / "model" / ".." / "model", text_corpus, tmp_path / "out")
    assert fingerprint(respelled, CheckpointWeights(model)) == before
    file = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(file)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1  # a fine-tune: same names, shapes and sizes
    save_file(tensors, file, metadata={"format": "pt"})
    after = fingerprint(job, CheckpointWeights(model))
    assert after["model_weights"] != before["model_weights"]
    assert {k: v for k, v in after.items() if k != "model_weights"} == \
        {k: v for k, v in before.items() if k != "model_weights"}


def test_a_budget_job_equals_in_memory_and_resumes_bit_identically(llama_dir, text_corpus, tmp_path, single_thread,
                                                                   monkeypatch):
    """--target-bpw streamed block by block gives the in-memory plan and tensors; killed after two blocks, its
    resume quantizes with the recorded plan (no second measurement) and ends bit-identical."""
    job = _config(llama_dir, text_corpus, tmp_path / "streamed", target_bpw=4.5)
    report = quantize(job, progress=False)
    _, _, quantized = _in_memory(job, tmp_path)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    assert report["target_bpw"]["layers"] == quantized.plan["layers"]
    assert report["bits_per_weight"]["linear"] <= 4.5
    killed = _config(llama_dir, text_corpus, tmp_path / "killed", target_bpw=4.5)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", KILLER, "2", json.dumps(killed.to_dict())], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    resumed = _config(llama_dir, text_corpus, tmp_path / "killed", target_bpw=4.5, resume=True)
    monkeypatch.setattr("quikft.jobs.quantize.job.measure_candidates", lambda *a, **k: pytest.fail("measured again"))
    quantize(resumed, progress=False)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "killed")


MEASURE_KILLER = textwrap.dedent("""
    import os, signal, sys
    from quikft.config import QuantizeJob, from_settings
    from quikft.jobs.quantize import state
    from quikft.jobs.quantize import quantize

    real = state.QuantizeState.save_measurement

    def save_measurement(self, blocks, measured):
        real(self, blocks, measured)
        if blocks == 2:  # SIGKILL once two blocks' candidates are committed
            os.kill(os.getpid(), signal.SIGKILL)

    state.QuantizeState.save_measurement = save_measurement
    quantize(from_settings(QuantizeJob, __import__("json").loads(sys.argv[1])), progress=False)
""")


def test_a_budget_job_killed_during_its_measurement_resumes_it(llama_dir, text_corpus, tmp_path, single_thread,
                                                              monkeypatch):
    straight = _config(llama_dir, text_corpus, tmp_path / "straight", target_bpw=4.0)
    report = quantize(straight, progress=False)
    killed = _config(llama_dir, text_corpus, tmp_path / "killed", target_bpw=4.0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", MEASURE_KILLER, json.dumps(killed.to_dict())], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    with pytest.raises(QuantizeStateError, match=r"measurement of 2 blocks done\); rerun with --resume"):
        quantize(killed, progress=False)
    measured = []
    real = budget_module.measure_layer
    monkeypatch.setattr(budget_module, "measure_layer", lambda *a, **k: measured.append(a[1]) or real(*a, **k))
    resumed = quantize(_config(llama_dir, text_corpus, tmp_path / "killed", target_bpw=4.0, resume=True),
                       progress=False)
    assert measured and not any(name.startswith(("model.layers.0.", "model.layers.1.")) for name in measured)
    assert resumed["target_bpw"]["layers"] == report["target_bpw"]["layers"]
    _assert_same_tensors(tmp_path / "straight", tmp_path / "killed")
