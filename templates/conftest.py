"""Keep pytest from collecting the templates: they are copied into a port's tests/ first."""

collect_ignore_glob = ["*.py"]
