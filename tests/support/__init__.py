"""Helpers shared by the tests: a real nats-server per test, the router in-process or as a subprocess, a fold oracle."""
