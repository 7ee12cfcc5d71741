"""The web pages under /ui/: what the registry stores, for people, read-only, behind the API's access rules."""
