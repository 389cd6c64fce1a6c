"""HTTP plumbing shared by handlers and middlewares: static files, client addresses, the OpenAPI document."""
