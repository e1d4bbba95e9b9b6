"""Compatibility name: the ternary byte layouts live in :mod:`bitnet_torch.formats.ternary` (below ``models``)."""

from ..formats.ternary import (  # noqa: F401 - re-exported names
    I2_S_BLOCK,
    I2_S_TYPE_ID,
    TQ1_0_BLOCK_BYTES,
    TQ2_0_BLOCK_BYTES,
    TQ_BLOCK,
    __all__,
    i2_s_nbytes,
    pack_i2_s,
    pack_tq1_0,
    pack_tq2_0,
    ternary_from_f16,
    unpack_i2_s,
    unpack_tq1_0,
    unpack_tq2_0,
)
