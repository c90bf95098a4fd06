"""meshd.scheduler"""
