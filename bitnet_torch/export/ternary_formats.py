"""Compatibility name: the ternary byte layouts live in :mod:`bitnet_torch.formats.ternary` (below ``models``)."""

from ..formats.ternary import *  # noqa: F401,F403
from ..formats.ternary import __all__  # noqa: F401
