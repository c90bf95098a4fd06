"""The gateway's view of its workers: pool, client, KV event feed, load, health."""
