"""The test suite; `tests.support` holds helpers the benches share (tiny model builders)."""
