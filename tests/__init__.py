# A package, so that pytest puts the repository root (the first folder up without an
# __init__.py) on the import path and the tests can import benchmark helpers as ``benchmarks.*``;
# the library itself comes from the installed package (pip install -e .).
