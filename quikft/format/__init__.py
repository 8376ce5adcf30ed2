"""The packed checkpoint format: the only code that knows its files, tensor names, shards, index and checksums.

On-disk format (``format_version`` 2)
-------------------------------------
A directory that follows ``save_pretrained`` conventions:

- ``config.json``: the model's config plus ``quantization_config`` =
  ``{quant_method: "quikft", format_version, bits, group_size, sym, salient, metric, act_order,
  method, dtype_rest, modules, settings, source_model}``; ``modules`` lists every quantized linear
  by its full name, ``salient`` the setting as given (a count, or a float fraction of each layer's
  input columns), ``dtype_rest`` is the dtype of every unquantized tensor (bf16 by default),
  ``settings`` holds the complete quantization scheme (provenance; no job settings such as the
  output path or device) and ``source_model`` the full-precision model that was quantized.
- ``model.safetensors``, or above 5 GB ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` (:mod:`~quikft.format.shards`): every tensor of the model's state dict, except that each
  quantized linear ``<name>.weight`` is replaced by the QuikLinear buffers ``<name>.qweight``,
  ``.qzeros``, ``.scales``, ``.g_idx``, ``.perm``, ``.salient_idx``, ``.salient_weight`` (and
  ``.bias`` in float32 when the layer has one); layouts and dtypes are documented in
  :mod:`quikft.nn.quik_linear`. Only the ``in - k`` non-salient columns have codes, stored
  group-contiguous: ``qweight`` is (ceil((in - k)*bits/32), out), ``perm`` (in - k,) names the
  input column of each stored column and ``g_idx`` (in - k,), non-decreasing, its group. Tied
  weights (e.g. ``lm_head`` tied to ``embed_tokens``) are stored once, under the name
  ``from_pretrained`` expects.
- tokenizer files and ``generation_config.json``.

Per-layer k and group count are not in ``config.json``: they are read from the tensor shapes
in the safetensors headers (``salient_idx`` is (k,), ``scales`` is (n_groups, out)), so a
layer whose k was capped needs no special case; the shapes of ``qweight`` and ``g_idx``
are then checked against the ``in - k`` they imply.

Format 1 (quikft 0.1) had no ``perm``: the non-salient columns were stored in ascending column
order with act-order's arbitrary ``g_idx``. Such checkpoints still load (the columns are
reordered in memory, the weights are identical) and ``quikft convert`` rewrites them as format 2.

Modules, lowest first: :mod:`~quikft.format.layout` (names and versions),
:mod:`~quikft.format.protocol` (what the writer needs of a quantizer's output),
:mod:`~quikft.format.header` (weights files and safetensors headers), :mod:`~quikft.format.reader`
(``config.json`` and its validation), :mod:`~quikft.format.shards` (weights files written, split by
size), :mod:`~quikft.format.writer`, :mod:`~quikft.format.loader`
(strict loading; the transformers quantizer in :mod:`quikft.hf` runs the same checks),
:mod:`~quikft.format.conversion` and :mod:`~quikft.format.inspect` (``quikft info``). The format
depends on :mod:`quikft.nn` (the layer whose buffers it stores), never on :mod:`quikft.quant`.
"""

from quikft.format.conversion import convert
from quikft.format.inspect import describe, format_description, stored_bits
from quikft.format.loader import check_checkpoint, load
from quikft.format.reader import is_packed_checkpoint
from quikft.format.writer import save_packed, write_packed, write_quik_model
from quikft.validation import CheckpointError

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "convert",
    "describe",
    "format_description",
    "is_packed_checkpoint",
    "load",
    "save_packed",
    "stored_bits",
    "write_packed",
    "write_quik_model",
]
