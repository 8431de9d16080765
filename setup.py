"""Builds featx's one compiled piece, the linear head's SGD kernel (featx/heads/_fused.c); the rest is setup.cfg.

``optional=True``: without a C compiler (or OpenMP) featx still installs, and the linear head uses PyTorch ops."""

from setuptools import Extension, setup

KERNEL_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-std=gnu11", "-Wno-psabi"]

setup(ext_modules=[Extension("featx.heads._fused", ["featx/heads/_fused.c"], extra_compile_args=KERNEL_FLAGS,
                             extra_link_args=["-fopenmp"], optional=True)])
