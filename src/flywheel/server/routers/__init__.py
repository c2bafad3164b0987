"""HTTP routers: thin edges that parse, authorize and call into the services."""
