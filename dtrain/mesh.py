"""The device mesh of the `hsdp` profile: FSDP2 sharded inside a group of ranks (`dp_shard`, a node by
default) and replicated across the groups (`dp_replicate`), through Accelerate's `ParallelismConfig`.

The sizes travel as Accelerate's launcher passes them, `PARALLELISM_CONFIG_DP_REPLICATE_SIZE` and
`PARALLELISM_CONFIG_DP_SHARD_SIZE` in each rank's environment (`ACCELERATE_USE_PARALLELISM_CONFIG=true`
when the launch config has a `parallelism_config` block). `auto`, as accelerate_configs/hsdp.yaml has
them, means one replica per node: `dp_replicate` = WORLD_SIZE / LOCAL_WORLD_SIZE, `dp_shard` =
LOCAL_WORLD_SIZE. `dtrain launch hsdp --replicas R` passes the sizes it chose, and names them in
`DTRAIN_MESH` too, so a rank can refuse a mesh that is not the one asked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from dtrain.config import UserError

USE = "ACCELERATE_USE_PARALLELISM_CONFIG"
SIZE_VARS = {
    "dp_replicate": "PARALLELISM_CONFIG_DP_REPLICATE_SIZE",
    "dp_shard": "PARALLELISM_CONFIG_DP_SHARD_SIZE",
}
ASKED = "DTRAIN_MESH"  # set by `dtrain launch hsdp`: "dp_replicate=R,dp_shard=S"


@dataclass(frozen=True)
class Mesh:
    replicate: int
    shard: int

    @property
    def size(self) -> int:
        return self.replicate * self.shard

    def dims(self) -> dict[str, int]:
        return {"dp_replicate": self.replicate, "dp_shard": self.shard}

    def env(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.dims().items())

    def __str__(self) -> str:  # as the start-up line and the docs write it
        return f"{self.replicate}x{self.shard} (dp_replicate x dp_shard)"


def parse_asked(text: str) -> Mesh:
    sizes = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return Mesh(int(sizes["dp_replicate"]), int(sizes["dp_shard"]))


def requested(env=os.environ) -> Mesh | None:
    """The mesh this rank's launch asks for (`auto` sizes resolved), or None without a parallelism config.
    Writes the resolved sizes back into `env`, where Accelerate's ParallelismConfig reads them."""
    if env.get(USE, "false").lower() != "true":
        return None
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    auto = {"dp_replicate": max(1, world // max(1, local)), "dp_shard": local}
    sizes = {}
    for dim, var in SIZE_VARS.items():
        raw = env.get(var, "auto").strip().lower()
        if raw in ("auto", "", "none"):
            sizes[dim] = auto[dim]
        elif raw.isdigit() and int(raw) > 0:
            sizes[dim] = int(raw)
        else:
            raise UserError(
                f"parallelism_config {var.lower()} must be a positive number or auto (got {raw!r})"
            )
        env[var] = str(sizes[dim])
    mesh = Mesh(sizes["dp_replicate"], sizes["dp_shard"])
    if mesh.size != world:
        raise UserError(
            f"the hsdp mesh {mesh} has {mesh.size} ranks but the job has {world}; pass --replicas R with R "
            f"dividing {world} to dtrain launch (dp_shard = processes / R), or fix parallelism_config in the YAML"
        )
    return mesh


def _cpu_rehearsal(env=os.environ) -> bool:
    """FSDP asked for on CPU ranks: Accelerate's ParallelismConfig refuses MULTI_CPU in Accelerator.__init__,
    before runtime.enable_fsdp_on_cpu can make the run FSDP; the mesh is then applied after that."""
    import torch

    return not torch.cuda.is_available() and env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextmanager
def held_back(env=os.environ):
    """Around `Accelerator(...)`: on a CPU rehearsal, hide the parallelism config from its validation and
    yield the mesh to apply once FSDP is on (`apply`); elsewhere Accelerate builds the mesh itself."""
    mesh = requested(env)
    if mesh is None or not _cpu_rehearsal(env):
        yield None
        return
    env.pop(USE)
    try:
        yield mesh
    finally:
        env[USE] = "true"


def apply(accelerator, mesh: Mesh) -> None:
    """The mesh on a CPU rehearsal, set where Accelerate's FSDP2 preparation reads it (`state.device_mesh`,
    `state.parallelism_config`), then Accelerate's own validation, now that the distributed type is FSDP.
    Accelerate internals, as runtime.enable_fsdp_on_cpu (which names an untested Accelerate version just
    before this runs); `check` and the run's recorded placements fail loudly if it stops working."""
    from accelerate import ParallelismConfig

    config = ParallelismConfig(dp_replicate_size=mesh.replicate, dp_shard_size=mesh.shard)
    state = accelerator.state
    state.parallelism_config = config
    state.device_mesh = config.get_device_mesh(accelerator.device.type)
    try:
        config._validate_accelerator(accelerator)
    except ValueError as exc:
        raise UserError(f"the hsdp mesh {mesh}: {' '.join(str(exc).split())[:300]}") from None


def mesh_of(accelerator) -> Mesh | None:
    """The data-parallel mesh Accelerate set up (None: no parallelism config, or a 1-D one)."""
    config = getattr(accelerator.state, "parallelism_config", None)
    if config is None or getattr(accelerator.state, "device_mesh", None) is None:
        return None
    return Mesh(config.dp_replicate_size, config.dp_shard_size)


def check(accelerator, launcher_settings: Callable[[], dict]) -> None:
    """Refuse a run whose mesh is not the one asked for, by `dtrain launch hsdp` (DTRAIN_MESH) or by the
    config file of a plain `accelerate launch` (`launcher_settings()`, read only when no mesh came up and
    dtrain launch did not start the job): `--multi_gpu` or `--use_fsdp` on the accelerate launch command
    line makes the launcher drop the YAML's parallelism_config silently, and the run would be plain DDP or
    full-mesh FSDP."""
    from accelerate.utils import DistributedType

    text = os.environ.get(ASKED)
    wanted = parse_asked(text) if text else None
    if wanted is None and (
        "DTRAIN_PROFILE" in os.environ  # dtrain launch, no mesh asked for
        or mesh_of(accelerator) is not None
        or not launcher_settings().get("parallelism_config")
    ):
        return
    got = mesh_of(accelerator)
    if got is None or accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(
            f"the launch asked for the hsdp mesh{f' {wanted}' if wanted else ''} but Accelerate set up "
            f"{accelerator.distributed_type.name} without it (a --multi_gpu or --use_fsdp on the accelerate "
            "launch command line drops the YAML's parallelism_config); launch with `dtrain launch hsdp` or "
            "`accelerate launch --config_file accelerate_configs/hsdp.yaml` and no distributed-type flag"
        )
    if wanted is not None and got != wanted:
        raise UserError(f"the launch asked for the hsdp mesh {wanted} but Accelerate set up {got}")


def describe(model, accelerator) -> dict | None:
    """run_info.json's `distributed.mesh`: dimension names and sizes, and the parameters' placements (each
    distinct placement with the number of parameter tensors that have it)."""
    mesh = getattr(accelerator.state, "device_mesh", None)
    if mesh is None or mesh_of(accelerator) is None:
        return None
    from torch.distributed.tensor import DTensor

    placements: dict[str, int] = {}
    for p in model.parameters():
        if isinstance(p, DTensor):
            key = ", ".join(repr(pl) for pl in p.placements)
            placements[key] = placements.get(key, 0) + 1
    names = list(mesh.mesh_dim_names or ())
    return {
        "dims": dict(zip(names, mesh.mesh.shape, strict=True)),
        "placements": placements,
    }
