"""Built-in backends: each module is a plugin registered through the same hooks as third-party ones,
except ``view``, the terminal view of a report and the text helpers the exporters share with it."""
