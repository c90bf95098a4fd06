"""meshd.proto"""
