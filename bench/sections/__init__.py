"""The benchmark's sections, one module each; bench/run.py runs them in order (a section's JSON kind is
its function's name)."""
