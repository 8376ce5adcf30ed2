"""Kept for compatibility: the packed format moved to :mod:`quikft.format`.

Every public name this module had is re-exported from its new home (``from quikft.checkpoint
import load`` keeps working); code in quikft imports :mod:`quikft.format` directly.
"""

from quikft.format.conversion import (  # noqa: F401
    CONVERT_REPORT,
    convert,
)
from quikft.format.header import (  # noqa: F401
    read_header,
    read_headers,
    read_metadata,
    weight_files,
    weights_source,
)
from quikft.format.inspect import (  # noqa: F401
    bits_of,
    describe,
    format_description,
    kernel_plan,
    stored_bits,
)
from quikft.format.layout import (  # noqa: F401
    CONFIG_NAME,
    DTYPE_REST,
    EXPERTS_KEY,
    FORMAT_VERSION,
    INDEX_NAME,
    LAYER_BITS_KEY,
    QUANT_METHOD,
    QUIK_TENSORS,
    READABLE_VERSIONS,
    REQUIRED_KEYS,
    SAFETENSORS_DTYPES,
    SETTING_KEYS,
    V1_TENSORS,
    WEIGHTS_NAME,
    TensorInfo,
    declared_bits,
    rest_dtype,
    tied_weight_keys,
)
from quikft.format.loader import (  # noqa: F401
    VERIFY_ON_LOAD,
    check_checkpoint,
    check_layer_values,
    check_tensors,
    finish_loading,
    load,
    materialize_non_persistent,
    swap_in_quik_layers,
)
from quikft.format.reader import (  # noqa: F401
    EXPERT_COUNT_KEYS,
    SIZE_KEYS,
    check_model_config,
    is_packed_checkpoint,
    read_model_config,
    read_quantization_config,
    stored_blocks,
    validate_quantization_config,
)
from quikft.format.shards import (  # noqa: F401
    save_weights,
    write_shards,
)
from quikft.format.writer import (  # noqa: F401
    build_quantization_config,
    cast_unquantized,
    check_layer_grid,
    pack_into,
    packed_state_dict,
    save_packed,
    write_model_config,
    write_packed,
    write_quik_model,
)
from quikft.validation import (  # noqa: F401
    CheckpointError,
)
