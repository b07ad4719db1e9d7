"""Endpoint picker for LLM inference gateways."""
