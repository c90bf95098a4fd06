"""Pure admission logic: fleet ledger, replica leases, fair queueing, loop breaker, prices.

Plain data structures with clocks passed in and no I/O (no asyncio, ray, grpc, torch or
sockets); the gateway's async code wraps them and applies their verdicts.
"""
