"""Serving one request: mesh handler, choice runs, lifecycle, failures, prompts, shapes."""
