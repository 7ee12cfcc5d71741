"""The pull-through cache: repositories fetched from upstream registries on first pull, then served here."""
