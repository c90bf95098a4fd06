"""meshd.kv_transfer"""
