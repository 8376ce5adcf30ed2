"""Bits per weight: the prediction from a scheme equals the count on written checkpoints, and the
count is the bytes in the files."""

import json
import math
import struct

import pytest

from quikft.bits import Unquantized, count_bits, n_groups, packed_layer_tensors, predict_bits
from quikft.checkpoint import (
    DTYPE_REST,
    QUIK_TENSORS,
    describe,
    read_quantization_config,
    save_packed,
    stored_bits,
)
from quikft.config import QuantConfig
from quikft.data import calibration_windows
from quikft.models import load_model
from quikft.nn import PackedShape, QuikLinear
from quikft.quant.model import quantize_model

SCHEMES = [  # bits, salient (count or fraction), group size, method, dtype_rest, shard size
    (2, 0, 32, "rtn", "bf16", "5GB"),
    (3, 8, 32, "gptq", "bf16", "40KB"),  # sharded: the count adds every file
    (4, 0.05, 128, "rtn", "fp32", "5GB"),  # 3 of 64 and 8 of 160 columns
    (8, 0.1, -1, "rtn", "fp16", "5GB"),
]


def _stored_data_bytes(file) -> int:
    """A safetensors file's size minus its 8-byte length and JSON header: the tensors' bytes."""
    with open(file, "rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    return file.stat().st_size - 8 - header


@pytest.mark.parametrize(("bits", "salient", "group_size", "method", "rest", "shard"), SCHEMES)
def test_predicted_bits_equal_the_count_on_a_written_checkpoint(tiny_dir, corpus, tmp_path, bits, salient,
                                                                group_size, method, rest, shard):
    model, tokenizer = load_model(str(tiny_dir))
    config = QuantConfig(bits=bits, salient=salient, group_size=group_size, method=method, dtype_rest=rest,
                         nsamples=2, seqlen=16, clip_search=False)
    quantized = quantize_model(model, calibration_windows(tokenizer, corpus["text"], 2, 16, 0), config, progress=False)
    out = save_packed(model, tokenizer, quantized, tmp_path / "out", config, max_shard_size=shard)

    counted = stored_bits(out)
    files = sorted(out.glob("model*.safetensors"))
    assert (len(files) > 1) == (shard != "5GB")
    assert counted.model_bits == 8 * sum(_stored_data_bytes(file) for file in files)

    modules = read_quantization_config(out)["modules"]
    shapes = [tuple(model.get_submodule(name).weight.shape[::-1]) for name in modules]
    other = sum(p.numel() for p in model.parameters()) - sum(i * o for i, o in shapes)  # a tied head once
    predicted = predict_bits(shapes, bits, salient, group_size, Unquantized(other, DTYPE_REST[rest].itemsize))
    assert predicted == counted
    assert counted.linear_weights == sum(i * o for i, o in shapes)
    assert 0 < counted.linear_bpw < counted.model_bpw
    assert describe(out)["bits_per_weight"] == counted.linear_bpw  # info shows the shared count


def test_packed_layer_tensors_are_the_quik_linear_buffers():
    for in_features, out_features, bits, k, group_size in [(64, 24, 3, 6, 16), (160, 64, 2, 0, 32),
                                                           (96, 40, 8, 95, -1), (33, 7, 4, 5, 128)]:
        groups = n_groups(in_features - k, group_size)
        layer = QuikLinear(PackedShape(in_features, out_features, bits, group_size, k, groups))
        buffers = {name: (tuple(t.shape), t.element_size()) for name, t in layer.state_dict().items()}
        assert buffers == packed_layer_tensors(in_features, out_features, bits, k, groups)
        assert set(buffers) == set(QUIK_TENSORS)


def test_the_count_leaves_the_bias_to_the_model_figure():
    class Info:
        def __init__(self, shape, itemsize):
            self.shape, self.nbytes = shape, itemsize * math.prod(shape)

    tensors = {f"l.{name}": Info(shape, size)
               for name, (shape, size) in packed_layer_tensors(40, 24, 4, 8, 1).items()}
    tensors["l.bias"] = Info((24,), 4)
    tensors["norm.weight"] = Info((40,), 2)
    count = count_bits(tensors, ["l"], QUIK_TENSORS)
    assert count.linear_weights == 40 * 24 and count.model_params == 40 * 24 + 24 + 40
    assert count.model_bits == count.linear_bits + 8 * (4 * 24 + 2 * 40)
    assert count.linear_bits == predict_bits([(40, 24)], 4, 8, -1).linear_bits


def test_the_default_scheme_on_smollm2_gives_the_documented_figures():
    """SmolLM2-135M's linears (30 blocks of q, k, v, o, gate, up, down): what `quikft info` printed."""
    hidden, inter, kv = 576, 1536, 192
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
              (inter, hidden)] * 30
    assert round(predict_bits(shapes, 3, 128, 128).linear_bpw, 2) == 5.65
    assert round(predict_bits(shapes, 4, 0, 128).linear_bpw, 2) == 4.26
    json.dumps(predict_bits(shapes, 3, 0.03, 128).to_dict())  # reports store it as JSON
