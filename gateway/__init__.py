"""The Envoy gateway: its configuration template and the code that renders it."""
