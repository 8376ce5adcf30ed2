"""Bit-packing of b-bit integer codes into int32 words (the on-disk format).

Layout (GPTQ packing convention, b in {2, 3, 4, 8})
---------------------------------------------------
A sequence of ``n`` codes ``c_0 .. c_{n-1}`` is written as one little-endian
bit stream: bit ``j`` of code ``c_i`` sits at stream position ``b*i + j``.
Stream position ``p`` is bit ``p % 32`` of word ``p // 32`` (bit 0 = least
significant).  So for 2/4/8 bits a word holds 32/b whole codes, code ``i`` at
bit offset ``b*(i % (32/b))``; for 3 bits 32 codes fill exactly 3 words and
codes 10 and 21 of each such triple straddle two words (GPTQ's 3-bit layout).
The stream is zero-padded up to a whole word, so ``n`` codes take
``ceil(n*b/32)`` words.  Words are stored as int32 holding the same 32 bits
(two's complement), i.e. a word whose bit 31 is set is negative.

- ``qweight``: (ceil(n*b/32), out_features) int32, where ``n = in_features - k`` is the
  number of *non-salient* input columns.  Only those columns have codes: the ``k`` salient
  columns are stored in FP16 beside the codes (see :mod:`quikft.nn.quik_linear`), so
  giving them codes too would waste ``b*k`` bits per row.  The non-salient columns appear
  in ascending original column order (the complement of ``salient_idx``), and column ``o``
  of ``qweight`` is the stream of row ``o`` of that (out, n) code matrix, i.e. codes are
  packed along the *input* dimension, transposed exactly like GPTQ's ``qweight`` (with
  ``k = 0`` it is GPTQ's layout verbatim), so a GPTQ kernel can run the quantized bulk on
  the gathered inputs ``x[..., nonsalient]``.
- ``qzeros``: (n_groups, ceil(out_features*b/32)) int32.  Row ``g`` is the
  stream of the zero-points of group ``g`` over the *output* dimension, as in
  GPTQ.  We store the true zero-point ``z`` (not GPTQ v1's ``z - 1``), so that
  dequantization is simply ``(code - z) * scale``; the checkpoint's own
  ``quant_method`` name keeps stock GPTQ loaders from misreading it.

Padding codes are zero and carry no information, so the true length cannot be
read from the words alone: unpacking takes the code count (``in_features - k``,
resp. ``out_features``) from the caller.  A packed layer is still self-describing
because ``g_idx`` has one entry per packed column (``in_features - k``),
``salient_idx`` has ``k`` and ``scales`` has ``out_features`` columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD_MASK = (1 << 32) - 1


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    _check_bits(bits)
    return (n * bits + 31) // 32


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack (out, n) codes into a GPTQ-style (ceil(n*bits/32), out) int32 ``qweight``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
    return pack_dim0(_as_codes(codes, bits).t(), bits)


def unpack_codes(qweight: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (words, out) int32 -> (out, n) uint8."""
    return unpack_dim0(qweight, bits, n).t().contiguous()


def pack_zeros(zeros: Tensor, bits: int) -> Tensor:
    """Pack (out, n_groups) integer-valued zero-points into (n_groups, words) int32."""
    if zeros.dim() != 2:
        raise ValueError(f"zeros must be 2-D (out, n_groups), got shape {tuple(zeros.shape)}")
    return pack_dim0(_as_codes(zeros, bits), bits).t().contiguous()


def unpack_zeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    """Inverse of :func:`pack_zeros`: (n_groups, words) int32 -> (out, n_groups) float32."""
    return unpack_dim0(qzeros.t(), bits, out_features).to(torch.float32)


def pack_dim0(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (n, m) along dim 0 into (ceil(n*bits/32), m) int32 words.

    The generic primitive behind :func:`pack_codes` and :func:`pack_zeros`;
    the codes must already lie in [0, 2^bits - 1] (larger values would spill
    into their neighbours; the public functions check this).
    """
    _check_bits(bits)
    n, m = codes.shape
    n_blocks = -(-n // 32)
    # Zero-pad to whole 32-code blocks; padding codes yield zero bits only.
    padded = torch.zeros(n_blocks * 32, m, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    slots = padded.view(n_blocks, 32, m)
    # Accumulate in int64 so setting bit 31 cannot overflow a signed word.
    words = torch.zeros(n_blocks, bits, m, dtype=torch.int64, device=codes.device)
    for p, word, offset in _code_slots(bits):
        code = slots[:, p].to(torch.int64)
        words[:, word] |= (code << offset) & _WORD_MASK
        if offset + bits > 32:  # straddles: the high bits open the next word
            words[:, word + 1] |= code >> (32 - offset)
    return _to_int32_bits(words.view(n_blocks * bits, m)[: packed_words(n, bits)])


def unpack_dim0(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_dim0`: (ceil(n*bits/32), m) int32 -> (n, m) uint8."""
    _check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError("packed words must be a 2-D int32 tensor")
    if words.shape[0] != packed_words(n, bits):
        raise ValueError(
            f"{words.shape[0]} words cannot hold exactly {n} codes of {bits} bits "
            f"(expected {packed_words(n, bits)})"
        )
    m = words.shape[1]
    n_blocks = -(-n // 32)
    blocks = torch.zeros(n_blocks * bits, m, dtype=torch.int32, device=words.device)
    blocks[: words.shape[0]] = words
    blocks = blocks.view(n_blocks, bits, m)
    codes = torch.empty(n_blocks, 32, m, dtype=torch.uint8, device=words.device)
    mask = (1 << bits) - 1
    for p, word, offset in _code_slots(bits):
        # `>>` on int32 sign-extends, so only the 32 - offset low bits of the
        # shifted word are genuine: keep those before merging the next word's
        # low bits above them.  `& mask` then drops everything past the code.
        code = blocks[:, word] >> offset
        if offset + bits > 32:
            genuine = code & ((1 << (32 - offset)) - 1)
            code = genuine | (blocks[:, word + 1] << (32 - offset))
        codes[:, p] = code & mask
    return codes.view(n_blocks * 32, m)[:n]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _as_codes(values: Tensor, bits: int) -> Tensor:
    """Validate integer values in [0, 2^bits - 1] and return them as uint8."""
    _check_bits(bits)
    if values.is_floating_point() and not torch.equal(values.round(), values):
        raise ValueError("values to pack must be integer-valued")
    if values.numel() and (values.min() < 0 or values.max() > (1 << bits) - 1):
        raise ValueError(f"values to pack must lie in [0, {(1 << bits) - 1}]")
    return values.to(torch.uint8)


def _code_slots(bits: int) -> list[tuple[int, int, int]]:
    """(code, word, bit offset) for the 32 codes that fill one block of ``bits`` words.

    32 codes of b bits are exactly b words, so the position of a code inside
    its block is the same in every block; only 32 slots need describing.
    """
    return [(p, *divmod(bits * p, 32)) for p in range(32)]


def _to_int32_bits(words: Tensor) -> Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as two's-complement int32."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
