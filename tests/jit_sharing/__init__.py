"""Templates for tests/test_jit_sources.py: kernels sharing a @jit helper. The test copies this package
into tmp_path, edits the copy and imports it (@jit functions need source files)."""
