"""Build script.

All metadata lives in pyproject.toml. This file exists so that the optional compiled
extension (fimlora._C, from csrc/) can be added by a later change without restructuring
the build; today the package is pure Python.
"""

from setuptools import setup

setup()
