"""Weights files split by size: one ``model.safetensors`` under the limit, shards plus an index above it,
from memory or from files written block by block, and every loader reading every layout alike."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import read_weights
from safetensors.torch import load_file

from quikft.cli import main
from quikft.format import check_checkpoint, load, shards
from quikft.format.header import read_header
from quikft.format.shards import save_weights, write_index, write_shards

INDEX = "model.safetensors.index.json"


def _weights_files(directory):
    return sorted(path.name for path in directory.glob("model*.safetensors"))


def _state(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """float32 tensors of the given element counts, each with its own values."""
    return {name: torch.arange(n, dtype=torch.float32) + i for i, (name, n) in enumerate(sizes.items())}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_weights_under_the_limit_are_one_file_without_an_index(tmp_path):
    state = _state({"a": 100, "b": 300, "c": 50})
    write_shards(state, tmp_path)
    assert _weights_files(tmp_path) == ["model.safetensors"] and not (tmp_path / INDEX).exists()
    _assert_equal(load_file(tmp_path / "model.safetensors"), state)


def test_weights_over_the_limit_are_shards_in_order_with_an_index(tmp_path):
    state = _state({"a": 100, "b": 300, "c": 50, "d": 600})  # 400, 1200, 200, 2400 bytes
    write_shards(state, tmp_path, max_shard_size=1600)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert _weights_files(tmp_path) == names
    index = json.loads((tmp_path / INDEX).read_text())
    # In order, a new shard when the next tensor would overflow it; a tensor above the limit at once
    # in a shard of its own (as save_pretrained splits).
    assert index["weight_map"] == {"a": names[0], "b": names[0], "d": names[1], "c": names[2]}
    assert index["metadata"]["total_size"] == 4200
    _assert_equal(read_weights(tmp_path), state)


@pytest.mark.parametrize("limit", [None, 2000])
def test_weights_from_block_files_are_the_same_tensors_split_by_size(tmp_path, limit):
    """The streamed job's assembly: the rest in memory, then every block's file, read a shard at a time."""
    rest = _state({"embed": 200, "norm": 20})
    blocks = [_state({f"layers.{i}.q": 150, f"layers.{i}.k": 60}) for i in range(3)]  # 3400 bytes in all
    files = []
    for i, block in enumerate(blocks):
        files.append(tmp_path / f"block-{i}.safetensors")
        save_weights(block, files[-1])
    out = tmp_path / "out"
    out.mkdir()
    write_shards(rest, out, limit, files=files)
    _assert_equal(read_weights(out), {**rest, **{k: v for block in blocks for k, v in block.items()}})
    if limit is None:
        assert _weights_files(out) == ["model.safetensors"] and not (out / INDEX).exists()
        return
    assert len(_weights_files(out)) == 2  # the second block's tensors split between the two
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    for name in _weights_files(out):
        stored = read_header(out / name)
        assert sum(info.nbytes for info in stored.values()) <= limit
        assert {key for key, file in weight_map.items() if file == name} == stored.keys()


def test_a_tensor_both_in_memory_and_in_a_file_is_refused(tmp_path):
    save_weights({"a": torch.zeros(3)}, tmp_path / "block.safetensors")
    with pytest.raises(ValueError, match="tensor a is both in memory and in"):
        write_shards({"a": torch.ones(3)}, tmp_path, files=[tmp_path / "block.safetensors"])


def _relayout(source, target, groups) -> None:
    """``source``'s checkpoint with its tensors regrouped into ``groups`` (lists of name prefixes) of
    shards, as an index names them; the other files copied as they are."""
    tensors = read_weights(source)
    _copy_all_but_weights(source, target)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        part = {key: t for key, t in tensors.items() if group(key)}
        save_weights(part, target / name)
        weight_map.update(dict.fromkeys(part, name))
    assert weight_map.keys() == tensors.keys()
    write_index(target, weight_map, {"total_size": sum(t.nbytes for t in tensors.values())})


def _copy_all_but_weights(source, target) -> None:
    target.mkdir()
    for path in source.iterdir():
        if not path.name.startswith("model"):
            (target / path.name).write_bytes(path.read_bytes())


def _in_block(index):
    return lambda key: key.startswith(f"model.layers.{index}.")


def _outside_blocks(key):
    return not key.startswith("model.layers.")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_loader_reads_every_layout_alike(packed, tmp_path, exact_kernels):
    """One file (what a small checkpoint is now), shards by size, and the one shard per block (plus
    one for the rest) that streamed jobs wrote before: the same tensors, logits, checks and info."""
    from transformers import AutoModelForCausalLM

    assert _weights_files(packed) == ["model.safetensors"] and not (packed / INDEX).exists()
    blocks = sorted({int(key.split(".")[2]) for key in read_weights(packed) if key.startswith("model.layers.")})
    per_block = tmp_path / "per-block"
    _relayout(packed, per_block, [_outside_blocks, *(_in_block(i) for i in blocks)])
    assert len(_weights_files(per_block)) == len(blocks) + 1
    by_size = tmp_path / "by-size"
    _copy_all_but_weights(packed, by_size)
    write_shards(read_weights(packed), by_size, max_shard_size=40_000)
    assert len(_weights_files(by_size)) > 2
    ids = torch.arange(2, 34).unsqueeze(0)
    loaded = _logits(load(packed, dtype=torch.float32), ids)
    hf = _logits(AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32), ids)
    checked = check_checkpoint(packed, verify=True)
    for directory in (per_block, by_size):
        _assert_equal(read_weights(directory), read_weights(packed))
        assert torch.equal(_logits(load(directory, dtype=torch.float32, verify=True), ids), loaded)
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), ids), hf)
        verified = check_checkpoint(directory, verify=True)
        assert verified["layers"] == checked["layers"] and not verified["checksums"]["files_without_checksums"]
        assert verified["checksums"]["tensors"] == checked["checksums"]["tensors"]
        assert verified["checksums"]["files"] == len(_weights_files(directory))
        info = CliRunner().invoke(main, ["info", str(directory), "--verify", "--json"])
        assert info.exit_code == 0, info.output


def test_save_packed_shards_by_size(tiny, text_file, tmp_path):
    from quikft.config import QuantConfig
    from quikft.data import calibration_windows
    from quikft.format import save_packed
    from quikft.quant.model import quantize_model

    model, tokenizer = tiny
    config = QuantConfig(bits=3, salient=8, group_size=32, nsamples=4, seqlen=32, clip_search=False)
    quantized = quantize_model(model, calibration_windows(tokenizer, str(text_file), 4, 32, 0), config,
                               progress=False)
    one = save_packed(model, tokenizer, quantized, tmp_path / "one", config)
    several = save_packed(model, tokenizer, quantized, tmp_path / "several", config, max_shard_size="40KB")
    assert _weights_files(one) == ["model.safetensors"]
    assert len(_weights_files(several)) > 1 and (several / INDEX).exists()
    for path in several.glob("model-*.safetensors"):
        stored = read_header(path).values()
        assert len(stored) == 1 or sum(info.nbytes for info in stored) <= 40_000, path.name
    _assert_equal(read_weights(one), read_weights(several))


def test_the_default_limit_is_the_formats(monkeypatch, tmp_path):
    """Writers without a limit use shards.MAX_SHARD_SIZE as it is when they run (a test may lower it)."""
    monkeypatch.setattr(shards, "MAX_SHARD_SIZE", 1000)
    write_shards(_state({"a": 200, "b": 200}), tmp_path)
    assert len(_weights_files(tmp_path)) == 2
