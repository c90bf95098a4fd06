"""meshd.coordinator"""
