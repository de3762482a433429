"""Hub bot: watches Hub repos, receives webhooks, publishes pruned variants and opens PRs.

The `local_hub` subpackage is a local, Hub-compatible HTTP server used by the tests and the offline demos.
"""
