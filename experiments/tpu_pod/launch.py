"""Multi-host launcher for `jaxmoe.train.trainer.train`: one process per host, started the same way on every host.

  python experiments/tpu_pod/launch.py --config experiments/configs/grin-moe-v5p-128.yaml \
      --fsdp 4 --expert 16 [KEY=VALUE overrides ...]

Distributed setup (`jax.distributed.initialize`), each flag falling back to an environment variable:
  --coordinator-address  JAX_COORDINATOR_ADDRESS   host:port of process 0 (not needed on Cloud TPU or under
                                                   SLURM / Open MPI, where JAX detects the cluster itself)
  --num-processes        JAX_NUM_PROCESSES         number of processes (hosts) in the job
  --process-id           JAX_PROCESS_ID            this process's index in [0, num_processes)
  --local-devices        JAX_LOCAL_DEVICE_IDS      comma-separated local device ids this process drives (GPU)
  --no-distributed       skip initialize(): one process driving its local devices (for trying the launcher out)
On CPU (trying it out on one machine) XLA's cross-process collectives use gloo, jax 0.10.2's default
(`jax_cpu_collectives_implementation`).

Mesh: --data --fsdp --expert --tensor override the run config's `mesh` section (default: the config's sizes); their
product must be jax.device_count(), all processes' devices (jaxmoe.sharding.make_mesh), and the trainer shards the
model with jaxmoe.sharding.shard_model on it.

Every process runs `jaxmoe.train.trainer.train` with the same config: each builds only its rows of every global
batch, process 0 writes the run's files and logs, all save and restore the orbax checkpoints. `run_dir` (and
`data.data_dir`, if set) must be on storage every host sees at the same path (NFS, Filestore, a gcsfuse mount).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import jax

from jaxmoe.config import get_preset
from jaxmoe.sharding import make_mesh, partition_spec
from jaxmoe.train.run_config import load_run_config, run_config_from_dict


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="YAML run config (jaxmoe.train.run_config)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run config overrides, e.g. optim.steps=10")
    parser.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    parser.add_argument("--local-devices", default=os.environ.get("JAX_LOCAL_DEVICE_IDS"),
                        help="comma-separated local device ids")
    parser.add_argument("--no-distributed", action="store_true", help="do not call jax.distributed.initialize()")
    for axis in ("data", "fsdp", "expert", "tensor"):
        parser.add_argument(f"--{axis}", type=int, default=None, help=f"mesh axis {axis!r} size (default: the config's)")
    return parser.parse_args(argv)


def initialize(args: argparse.Namespace) -> None:
    if args.no_distributed:
        return
    local = None if not args.local_devices else [int(i) for i in args.local_devices.split(",")]
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id, local_device_ids=local)


def main(argv=None) -> int:
    args = parse_args(argv)
    initialize(args)
    log = print if jax.process_index() == 0 else (lambda *_: None)
    print(f"process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}: local devices "
          f"{[d.id for d in jax.local_devices()]}", flush=True)
    log(f"processes {jax.process_count()}, devices {jax.device_count()} ({jax.local_device_count()} local, "
        f"{jax.devices()[0].platform})")
    config = load_run_config(args.config, args.overrides)
    sizes = {axis: getattr(args, axis) or getattr(config.mesh, axis) for axis in ("data", "fsdp", "expert", "tensor")}
    mesh = make_mesh(**sizes)  # raises unless the sizes multiply to jax.device_count()
    preset = get_preset(config.model.preset) if config.model.preset else None
    if preset is not None and preset.moe is not None:
        partition_spec(("experts",), (preset.moe.num_experts,), mesh)  # raises when the experts do not divide
    log(f"mesh {dict(mesh.shape)}")
    config = run_config_from_dict({**config.to_dict(), "mesh": sizes})
    from jaxmoe.train.trainer import train  # imports tensorflow_datasets: only once the checks have passed

    train(config, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
