"""Package setup. Set ``BITNET_TORCH_BUILD_EXT=1`` to compile the kernels ahead of time (see README)."""

from setuptools import setup

setup()
