"""HTTP handlers, one module per resource: parse, call server/, answer."""
