import math

import pytest
import torch

from quikft.packing import (
    pack_codes,
    pack_zeros,
    packed_words,
    unpack_codes,
    unpack_zeros,
)

BITS = (2, 3, 4, 8)


def full_range_codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    """Random codes that include 0 and the maximum, plus one all-max row.

    An all-max row packs to words with bit 31 set, so the int32 sign handling
    is exercised on every shape.
    """
    gen = torch.Generator().manual_seed(seed)
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (rows, cols), generator=gen, dtype=torch.uint8)
    codes[0, 0] = top
    codes[-1, -1] = 0
    codes[rows // 2] = top
    return codes


def reference_pack(codes: list[list[int]], bits: int) -> list[list[int]]:
    """Straightforward bit-by-bit packer: (out, in) codes -> (words, out) int32."""
    n_in = len(codes[0])
    n_words = math.ceil(n_in * bits / 32)
    columns = []
    for row in codes:
        words = [0] * n_words
        for i, code in enumerate(row):
            for j in range(bits):
                pos = bits * i + j
                words[pos // 32] |= ((code >> j) & 1) << (pos % 32)
        columns.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return [list(r) for r in zip(*columns, strict=True)]


@pytest.mark.parametrize("bits", BITS)
# 448 and 1408: the non-salient column counts of the default model with k = 128.
@pytest.mark.parametrize("n_in", [576, 1536, 448, 1408, 100, 33, 1])
@pytest.mark.parametrize("n_out", [1, 7, 576])
def test_codes_roundtrip(bits: int, n_in: int, n_out: int) -> None:
    codes = full_range_codes(n_out, n_in, bits, seed=n_in * 7 + n_out + bits)
    qweight = pack_codes(codes, bits)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (math.ceil(n_in * bits / 32), n_out)
    assert qweight.shape[0] == packed_words(n_in, bits)
    unpacked = unpack_codes(qweight, bits, n_in)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_out", [1, 7, 576, 100, 33])
@pytest.mark.parametrize("n_groups", [1, 5])
def test_zeros_roundtrip(bits: int, n_out: int, n_groups: int) -> None:
    zeros = full_range_codes(n_out, n_groups, bits, seed=n_out + bits).float()
    qzeros = pack_zeros(zeros, bits)
    assert qzeros.dtype == torch.int32
    assert qzeros.shape == (n_groups, math.ceil(n_out * bits / 32))
    unpacked = unpack_zeros(qzeros, bits, n_out)
    assert unpacked.dtype == torch.float32
    assert torch.equal(unpacked, zeros)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_in", [64, 70, 5])
def test_layout_matches_reference_packer(bits: int, n_in: int) -> None:
    codes = full_range_codes(3, n_in, bits, seed=bits + n_in)
    expected = torch.tensor(reference_pack(codes.tolist(), bits), dtype=torch.int32)
    assert torch.equal(pack_codes(codes, bits), expected)


def test_three_bit_straddling_codes() -> None:
    # Codes 10 and 21 straddle words 0/1 and 1/2 (GPTQ's 3-bit layout).
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101  # low two bits -> word 0 bits 30-31, top bit -> word 1 bit 0
    codes[0, 21] = 0b110  # low bit -> word 1 bit 31, top two bits -> word 2 bits 0-1
    codes[0, 31] = 0b111  # last code of the triple -> word 2 bits 29-31
    words = [w & 0xFFFFFFFF for w in pack_codes(codes, 3)[:, 0].tolist()]
    assert words == [0b01 << 30, (0b1 << 0) | (0b0 << 31), 0b11 | (0b111 << 29)]


def test_four_bit_word_is_little_endian() -> None:
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    assert pack_codes(codes, 4).item() == 0x76543210


def test_zeros_stored_as_true_value() -> None:
    zeros = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert pack_zeros(zeros, 8).item() == 0x04030201


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.full((2, 4), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(2, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        pack_zeros(torch.tensor([[0.5]]), 4)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, 2, dtype=torch.int32), 4, 8)
