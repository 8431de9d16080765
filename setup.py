"""Builds featx's one compiled piece, the linear head's SGD kernel (featx/heads/_fused.c); the rest is setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("featx.heads._fused", ["featx/heads/_fused.c"], extra_compile_args=[
    "-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-std=gnu11", "-Wno-psabi"], extra_link_args=["-fopenmp"], optional=True)])
