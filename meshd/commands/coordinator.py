"""`meshd coordinator start|stop`: deploy the coordinator actors on a (new or existing) Ray head.

`start` first prints a warning for each open surface of the config (`meshd/surfaces.py`); a head
it starts uses Ray token auth and listens on `ray.bind_host` (loopback by default).
"""

from __future__ import annotations

import argparse
import dataclasses

import ray

from meshd import raylocal, surfaces
from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.coordinator import actors
from meshd.coordinator.gateway import actor as gateways


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    state = cfg.coordinator.state_dir
    if args.action == "start":
        address = args.ray_address or cfg.ray.address
        surfaces.announce(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray,
                                                                           address=address)))
        try:
            if not address:
                address = raylocal.start_head(cfg.ray, state, args.ray_port)
                print(f"started Ray head at {address}; dashboard http://"
                      f"{cfg.ray.dashboard_host}:{cfg.ray.dashboard_port}")
            raylocal.init(cfg.ray, state, address)
        except (ConnectionError, RuntimeError) as e:
            raise CommandError(f"Ray: {e}") from None
        try:
            _, info = actors.deploy(cfg.coordinator, cfg.ray.namespace)
            gateways.deploy(cfg.gateway, cfg.ray.namespace, state_dir=state)
        except Exception as e:
            raise CommandError(f"coordinator did not start: {e}") from None
        finally:
            ray.shutdown()
        g = cfg.gateway
        print(f"coordinator: control plane {cfg.coordinator.grpc_host}:{info['grpc_port']}, "
              f"metrics http://{cfg.coordinator.grpc_host}:{info['metrics_port']}/metrics, "
              f"state {state}")
        if g.replicas:
            print(f"gateway: OpenAI API at http://{g.host}:{g.port}/v1 ({g.replicas} replicas)")
        return 0
    raylocal.init(cfg.ray, state, args.ray_address)
    try:
        gateways.stop(cfg.ray.namespace)
        stopped = actors.stop(cfg.ray.namespace)
    finally:
        ray.shutdown()
    print("coordinator stopped" if stopped else "no coordinator was running")
    if args.stop_ray:
        raylocal.stop_head(cfg.ray, state)
        print("Ray stopped")
    return 0
