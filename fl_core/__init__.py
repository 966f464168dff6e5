"""fl_core — the server side of sparsefl: data, strategies, clients, federation loop, reports, CLI."""
