"""meshd's out-of-tree vLLM V1 KV connector: prefill/decode disaggregation over meshd's
authenticated transports. Imported by vLLM only (it imports vllm); meshd never imports it.

    --kv-transfer-config '{"kv_connector": "MeshdConnector", "kv_role": "kv_producer",
        "kv_connector_module_path": "meshd.kv_transfer.vllm_connector",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"secret_file": "/path/secret", "host": "127.0.0.1",
                                      "port": 23456, "transport": "tcp"}}'

Design (see docs/vllm.md, "KV connector"):
- **Pull.** The prefill engine (P, `kv_producer`) runs the request with `max_tokens=1`; when it
  stops by the length cap and carried `do_remote_decode`, `request_finished` keeps its blocks
  (`delay_free`) and returns NixlConnector-style `kv_transfer_params` (`remote_request_id` = P's
  internal request id, `remote_block_ids`, `remote_host`/`remote_port` of P's meshd transfer
  server, `tp_size`, `meshd_transport`, `meshd_prompt_digest`). The blocks go under a **lease**
  in P's worker (`LeaseTable`, the transfer server's `BlockSource`): it ends when D confirmed an
  intact copy or after `lease_timeout_s`, and the worker then reports the request in
  `finished_sending` so vLLM frees the blocks. A fetch in flight renews the lease, so blocks are
  never freed under a transfer.
- The decode engine (D, `kv_consumer`) sees `do_remote_prefill`: `get_num_new_matched_tokens`
  claims the prompt tokens not cached locally for an **async** load; after allocation,
  `update_state_after_alloc` plans remote -> local blocks; D's worker pulls the whole request on
  a background thread over the transport P named (`puller.KVPuller`, shared with the embedded
  engine: a client per transport, built on first use) and reports it in `finished_recving`.
  Not layer-wise: the load runs between engine steps while the request waits in
  WAITING_FOR_REMOTE_KVS. P's side is `offering.make_offer` (scheduler: what the params name)
  and `offering.serve_kv` (worker: the one listening server), shared with the engine too.
- **Transports** (`transport` in the extra config; what P serves): `tcp` and `shm` move CPU KV
  in place, or CUDA KV staged through pinned host buffers; `cuda_ipc` (one host) and `nccl`
  move CUDA KV device to device. The connector asks vLLM for the `LBHNC` cache layout
  (`get_required_kvcache_layout`), so each layer is a `[B, H, N, C]` view whose blocks are
  dense; the wire names carry the view kind (`tcp+vllm-BHNC` on CPU, `tcp+vllm-cuda-BHNC`,
  `nccl+vllm-cuda-BHNC`... on CUDA, whose backends read C differently), and the handshake refuses a
  peer with another layout or transport.
- **Failure**: any transfer error (auth, connect, unknown request, timeout, CRC, a transport
  this process cannot run) reports the request's local blocks in
  `get_block_ids_with_load_errors`; with `kv_load_failure_policy=recompute` vLLM recomputes
  them locally. The reason is typed (`puller.PullOutcome.reason`: an `ErrorCode` or a
  `PullFailure`), counted by value in `RecvResults.errors`.
- Auth: meshd's mutual handshake (HMAC mesh secret or Ed25519 node keys); msgpack frames, no
  pickle.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from meshd.kv_transfer.auth import load_authenticator
from meshd.kv_transfer.conn import ServerConfig
from meshd.kv_transfer.lease_quota import LeaseQuota
from meshd.kv_transfer.leases import LeaseTable
from meshd.kv_transfer.mux import MuxServer
from meshd.kv_transfer.offering import make_offer, serve_kv
from meshd.kv_transfer.params import RemotePrefill
from meshd.kv_transfer.puller import KVPuller, PullFailure, PullOutcome
from meshd.kv_transfer.select import pull_transport
from meshd.kv_transfer.transport import KVViews, Peer
from meshd.kv_transfer.vllm_layout import layout_of
from meshd.kv_transfer.vllm_params import (
    TRANSFER_TIMEOUT_S,
    TRANSPORTS,
    ConnectorSettings,
    LoadPlan,
    RecvResults,
    plan_load,
    tokens_to_load,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# Under "vllm." so records use vLLM's handler and format.
log = logging.getLogger("vllm.meshd_connector")


class MeshdConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: pulls to start, leases to hold. Plain data."""

    def __init__(self, loads: list[dict[str, Any]], leases: list[tuple[str, list[int]]]) -> None:
        self.loads = loads
        self.leases = leases


class MeshdConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM V1 KV connector over meshd's transport (both roles; see module docstring)."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self._producer = bool(ktc.is_kv_producer)
        self._consumer = bool(ktc.is_kv_consumer)
        self._settings = ConnectorSettings.parse(ktc.kv_connector_extra_config,
                                                 producer=self._producer)
        self._engine_id = str(ktc.engine_id)
        self._kv_device = "cuda" if str(vllm_config.device_config.device_type) == "cuda" else "cpu"
        self._facts = self._settings.facts(self._kv_device)
        self._offer = make_offer(self._settings.transport, self._kv_device, self._facts)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) > 1:
            raise ValueError(
                f"MeshdConnector supports one KV cache group (plain full-attention models), "
                f"this model has {len(groups)}"
            )
        if role == KVConnectorRole.SCHEDULER:
            self._pending_loads: dict[str, LoadPlan] = {}
            self._pending_leases: dict[str, tuple[int, ...]] = {}
            pool = int(kv_cache_config.num_blocks) if kv_cache_config is not None else 0
            bound = self._settings.max_leased_blocks or max(1, pool * 3 // 4)
            self._quota = LeaseQuota(bound, bound)  # no callers here: the total bounds all
            log.info("meshd connector (scheduler) engine=%s producer=%s consumer=%s "
                     "transfer server %s:%s serving %s (%s KV, host %s)", self._engine_id,
                     self._producer, self._consumer, self._settings.remote_host,
                     self._settings.port, "|".join(self._offer.transports), self._kv_device,
                     self._facts.hostname)
        else:
            s = self._settings
            self._auth = load_authenticator(secret_file=s.secret_file,
                                            node_key_file=s.node_key_file,
                                            trusted_keys_file=s.trusted_keys_file,
                                            node_id=self._engine_id)
            self._leases = LeaseTable(s.lease_timeout_s, transfer_timeout_s=TRANSFER_TIMEOUT_S,
                                      lookup_wait_s=s.lookup_wait_s)
            self._recv = RecvResults()
            self._server: MuxServer | None = None
            self._puller: KVPuller | None = None  # a consumer's, from register_kv_caches
            self._inflight: set[str] = set()
            self._lock = threading.Lock()
            self._rank = 0

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """Per-layer `[B, H, N, C]` views with each block one dense range (vLLM's CPU backend
        has only this layout; on GPUs it replaces FlashAttention's default NHD order)."""
        model = vllm_config.model_config
        if model is not None and model.use_mla:
            return None  # MLA caches have no H axis; the one KV group check refuses them later
        return "LBHNC"

    # ==========================================================================================
    # scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        remote = RemotePrefill.parse(request.kv_transfer_params, allowed_transports=TRANSPORTS)
        if isinstance(remote, str):
            return 0, False
        if remote.tp_size != self._tp_size:
            log.warning("meshd: %s: prefill tp_size %d != ours %d; prefilling locally",
                        request.request_id, remote.tp_size, self._tp_size)
            return 0, False
        prompt = request.prompt_token_ids or []
        if not remote.matches(prompt):
            log.warning("meshd: %s: the prefill params are for another prompt; prefilling "
                        "locally", request.request_id)
            return 0, False
        count = tokens_to_load(remote, len(prompt), num_computed_tokens, self._block_size)
        return count, count > 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        if num_external_tokens <= 0:
            return  # nothing to load (a local hit); P's lease expires on its own
        remote = RemotePrefill.parse({**params, "do_remote_prefill": True},
                                     allowed_transports=TRANSPORTS)
        (block_ids, *_) = blocks.get_block_ids()
        prompt = request.prompt_token_ids or []
        plan: LoadPlan | str = (
            remote if isinstance(remote, str) else
            plan_load(request.request_id, remote, block_ids, len(prompt), num_external_tokens,
                      self._block_size)
        )
        if isinstance(plan, str):
            # The request already waits for remote KV: report a failed load so it recomputes.
            log.warning("meshd: %s: cannot plan the load (%s); recomputing",
                        request.request_id, plan)
            plan = LoadPlan(request.request_id, Peer("", 0), "", (), tuple(block_ids),
                            "tcp")
        elif not isinstance(remote, str):
            choice = pull_transport(remote, self._facts, self._kv_device)
            log.debug("meshd: %s: pulling over %s (%s)", request.request_id, choice.name,
                      choice.reason)
            plan = replace(plan, transport=choice.name)
        self._pending_loads[request.request_id] = plan

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = MeshdConnectorMetadata(
            loads=[p.to_dict() for p in self._pending_loads.values()],
            leases=[(rid, list(b)) for rid, b in self._pending_leases.items()],
        )
        self._pending_loads = {}
        self._pending_leases = {}
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """The worker's finished sends: those leases ended (pulled or expired); their blocks
        stop counting against the bound."""
        for rid in connector_output.finished_sending or ():
            self._quota.end(rid)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request, list(block_ids))

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request, list(block_ids[0]) if block_ids else [])

    def _finished(self, request: Request, block_ids: list[int]
                  ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode") or not self._producer:
            return False, None
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED or not block_ids:
            return False, None  # EOS or abort: free now, the decode side prefills itself
        rid = request.request_id
        refusal = self._quota.admit("", len(block_ids))
        if refusal is not None:  # free the blocks now; the decode side prefills itself
            log.warning("meshd: %s: not holding its %d blocks for a decode peer: %d held, "
                        "lease bound %d", rid, len(block_ids), refusal.used, refusal.bound)
            return False, None
        self._quota.settle("", len(block_ids), rid, len(block_ids))
        self._pending_leases[rid] = tuple(block_ids)
        return True, self._offer.params(
            request_id=rid, block_ids=block_ids, engine_id=self._engine_id,
            peer=Peer(self._settings.remote_host, self._settings.port), tp_size=self._tp_size,
            num_tokens=len(request.prompt_token_ids or []),
            prompt=request.prompt_token_ids or [],
        )

    # ==========================================================================================
    # worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.v1.kv_cache_interface import AttentionSpec

        group = self._kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        if not isinstance(spec, AttentionSpec) or getattr(spec, "sliding_window", None):
            raise ValueError(f"MeshdConnector: unsupported KV cache spec {type(spec).__name__}")
        names = [n for n in group.layer_names if n in kv_caches]
        layers = [kv_caches[n] for n in names]
        if not layers:
            raise ValueError("MeshdConnector: no KV cache tensors registered")
        num_blocks = int(self._kv_cache_config.num_blocks)
        if int(layers[0].shape[0]) != num_blocks:
            raise ValueError(
                f"MeshdConnector: KV views hold {layers[0].shape[0]} kernel blocks for "
                f"{num_blocks} scheduler blocks; use a --block-size equal to the attention "
                "backend's kernel block size (32 on CPU)"
            )
        layout = layout_of(layers, spec.num_kv_heads, spec.head_size, spec.block_size)
        self._rank = int(get_tensor_model_parallel_rank())
        views = KVViews(layers, layout, "vllm")
        if self._producer:
            serving = serve_kv(self._offer, views, self._auth, self._leases,
                               Peer(self._settings.host, self._settings.port + self._rank),
                               config=ServerConfig(transfer_timeout_s=TRANSFER_TIMEOUT_S))
            self._server = serving.server
            for name, why in serving.skipped.items():
                log.warning("meshd: not serving %s (decode peers that pick it will "
                            "recompute): %s", name, why)
        if self._consumer:
            self._puller = KVPuller(views, self._auth, self._settings.pull_timeout_s, log=log)
        t = layers[0]
        log.info("meshd connector (worker rank %d): %d layers on %s, view %s strides %s; "
                 "%d blocks x %d B/block; server %s %s", self._rank, len(layers), t.device,
                 tuple(t.shape), t.stride(), num_blocks, layout.bytes_per_block,
                 "|".join(self._server.wire_names) if self._server else "-",
                 self._server.address if self._server else "")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MeshdConnectorMetadata)
        for rid, blocks in meta.leases:
            self._leases.grant(rid, blocks)
        for d in meta.loads:
            plan = LoadPlan.from_dict(d)
            with self._lock:
                if plan.request_id in self._inflight:
                    continue
                self._inflight.add(plan.request_id)
            if not plan.remote_block_ids or self._puller is None:
                why = "no remote blocks" if self._puller else "not a kv_consumer"
                self._landed(plan, PullOutcome.failed(PullFailure.NO_PLAN, why))
                continue
            peer = Peer(plan.peer.host, plan.peer.port + self._rank)
            fut = self._puller.submit(plan.transport, peer, plan.remote_request_id,
                                      plan.remote_block_ids, plan.local_block_ids)
            fut.add_done_callback(partial(self._pulled, plan, peer))

    def _pulled(self, plan: LoadPlan, peer: Peer, fut: Future[PullOutcome]) -> None:
        """A pull's future is done (on a pull thread; or here at once if it already was)."""
        if fut.cancelled():
            return  # shutdown() cancelled it before it started: the engine is going away
        out = fut.result()  # KVPuller.fetch never raises
        if out.ok:
            log.info("meshd: pulled %d blocks (%d B) for %s from %s:%d via %s (remote %s) in "
                     "%.3f s", len(plan.local_block_ids), out.result.bytes, plan.request_id,
                     peer.host, peer.port, out.via, plan.remote_request_id, out.result.seconds)
        self._landed(plan, out)

    def _landed(self, plan: LoadPlan, out: PullOutcome) -> None:
        """Report a finished load; a failed (or impossible) one has its blocks recomputed."""
        with self._lock:
            self._inflight.discard(plan.request_id)
        if out.reason is None:
            self._recv.succeeded(plan.request_id, out.result.bytes, out.result.seconds)
            return
        log.warning("meshd: KV load for %s failed (%s); %d blocks will be recomputed",
                    plan.request_id, out.describe(), len(plan.local_block_ids))
        self._recv.failed(plan.request_id, plan.local_block_ids, out.reason)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are whole-request and asynchronous (finished before scheduling)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return None  # pull design: the decode side reads the prefill side's blocks in place

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        sending = self._leases.take_done()
        for rid in sending:
            log.info("meshd: lease of %s ended; blocks freed", rid)
        recving, _failed = self._recv.take()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._recv.take_bad_blocks()

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.WORKER:
            if self._server is not None:
                self._server.close()
            if self._puller is not None:
                self._puller.close()
