"""Test-session set-up: Numba's threads start before any test module imports torch, so torch
reuses Numba's OpenMP runtime (one runtime in the process, as the README asks of users who mix
the two; see embedded.runtime)."""

from embedded.runtime import start_threads

start_threads()
