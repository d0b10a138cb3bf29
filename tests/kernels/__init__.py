"""Fused-kernel tests (a package, so that its conftest is imported as ``kernels.conftest`` and never
shadows ``tests/conftest.py`` as the module ``conftest``)."""
