"""The OpenAI gateway: one replica's HTTP front, request serving and worker view.

    http/     the client side: server, connection (parsing, pipelining, deadlines), responder,
              sse, routes, openapi, errors, request validation (`openai_api`), `ApiRequest`
    serving/  one request: the mesh handler, the per-choice run, the lifecycle state machine,
              `failures` (worker failure -> lifecycle action -> client error), prompts at the
              edge, response shapes, the plain proxy, request metrics
    workers/  the workers: pool (membership, health, views), HTTP client, KV event feed, load
              scraping, static workers, cache-routing health monitor
    governance/  admission: tenants from keys, reservations on the fleet ledger's leases, fair
              share, the loop breaker, the usage endpoint, policy reload
    config    the `[gateway]` config tree; `runtime` assembles a replica; `actor` runs
              replicas as Ray actors; `__main__` runs one without Ray

Imports: `http` knows nothing of serving, workers or governance; `serving` uses `http`'s
request types, `workers` and `governance`; `governance` uses `http`'s request types and errors
(and `serving.loop_metrics`' lock-free histogram); `workers` uses none of them.
"""
