"""``minicpmv serve MODEL --ray-replicas N``: the server's FastAPI app (serve/app.py ``create_app``) as a Ray Serve
deployment of N replicas behind one HTTP endpoint. Each replica builds its own ``LLM`` (``num_cpus`` = threads);
``max_ongoing_requests`` is the engine's ``max_num_seqs``, so requests queue at Ray's router instead of piling
into one replica; Ray Serve replaces a replica that dies (failed health check) while the others keep serving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minicpmv.batch.ray_runner import require_ray


@dataclass
class ReplicaSpec:
    llm: dict[str, Any]  # LLM(**llm) keyword arguments, engine_config as a dict
    config: Any  # serve.config.ServerConfig
    threads: int = 1
    max_image_pixels: int | None = None
    pid_dir: str | None = None  # each replica writes its pid here (monitoring, tests)


def _builder(spec: ReplicaSpec):
    def build():
        import dataclasses

        import torch

        from minicpmv.engine.engine import EngineConfig
        from minicpmv.llm import LLM
        from minicpmv.serve.app import create_app

        torch.set_num_threads(spec.threads)
        if spec.pid_dir:
            import os
            from pathlib import Path

            Path(spec.pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))
        kwargs = dict(spec.llm)
        kwargs["engine_config"] = EngineConfig(**kwargs.pop("engine_config", {}))
        llm = LLM(**kwargs)
        if spec.max_image_pixels:
            settings = llm.processor.image_settings
            llm.processor.image_settings = dataclasses.replace(settings, max_pixels=spec.max_image_pixels)
        return create_app(llm, spec.config)

    return build


def deployment(spec: ReplicaSpec, replicas: int, max_ongoing_requests: int):
    require_ray()
    from ray import serve

    return serve.deployment(
        serve.ingress(_builder(spec))(),
        name="minicpmv",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": spec.threads},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )


def run(spec: ReplicaSpec, replicas: int, max_ongoing_requests: int, host: str, port: int,
        address: str | None = None, blocking: bool = True):
    """Start (or join) a cluster, deploy, and serve on host:port until interrupted (``blocking``)."""
    ray = require_ray()
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    app = deployment(spec, replicas, max_ongoing_requests).bind()
    serve.run(app, name="minicpmv", route_prefix="/", blocking=blocking)
