"""The GPU suite (`make test-gpu`, docs/gpu.md): the paths of dtrain that exist only on CUDA, each checked
against what the CPU suite proves. A package, so that its conftest is `gpu.conftest`, not a second
`conftest` beside tests/conftest.py."""
