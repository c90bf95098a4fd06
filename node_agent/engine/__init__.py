"""meshd.node_agent.engine"""
