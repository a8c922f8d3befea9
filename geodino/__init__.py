"""geodino."""
