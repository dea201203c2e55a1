"""tierroute: send each LLM request to the cheapest model tier that will answer it well."""

__version__ = "0.1.0"
