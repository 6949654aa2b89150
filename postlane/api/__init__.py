"""Postlane's HTTP API (``postlane api``): send, inspect and steer emails and sequences,
take inbound mail and one-click unsubscribes, over HTTP with API keys.

The package root imports nothing heavy: `postlane.api.settings` is read by
`postlane.config`, while FastAPI and uvicorn load only in `postlane.api.app` and the CLI.
"""
