"""Serving a trained policy: `policy.py` (requests, weights, responses), `api.py` (HTTP routes,
token, limits), `engine.py` (the vLLM engine loop), `deployment.py` (Ray Serve)."""
