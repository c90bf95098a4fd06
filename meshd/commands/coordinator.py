"""`meshd coordinator start|stop`: deploy the coordinator actors on a (new or existing) Ray head."""

from __future__ import annotations

import argparse

import ray

from meshd import raylocal
from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.coordinator import actors
from meshd.coordinator.gateway import actor as gateways


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    state = cfg.coordinator.state_dir
    if args.action == "start":
        address = args.ray_address or cfg.ray.address
        if not address:
            address = raylocal.start_head(cfg.ray, state, args.ray_port)
            print(f"started Ray head at {address}; dashboard http://{cfg.ray.dashboard_host}:"
                  f"{cfg.ray.dashboard_port}")
        raylocal.init(cfg.ray, state, address)
        try:
            _, info = actors.deploy(cfg.coordinator, cfg.ray.namespace)
            gateways.deploy(cfg.gateway, cfg.ray.namespace)
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
