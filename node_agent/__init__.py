"""meshd.node_agent"""
