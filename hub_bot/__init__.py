"""Hub bot: watches Hub repos (webhooks or polling), prunes new commits with configured recipes, and publishes
the variants (new repos or pull requests) with their measured results. See README.md in this folder.

The `local_hub` subpackage is a local, Hub-compatible HTTP server used by the tests and the offline demos.
"""
