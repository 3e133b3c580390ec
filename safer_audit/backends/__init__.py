"""Built-in backends: each module is a plugin registered through the same hooks as third-party ones."""
