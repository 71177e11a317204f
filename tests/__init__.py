"""ops-router's tests; the tree mirrors the packages. Shared helpers live in `tests.support`."""
