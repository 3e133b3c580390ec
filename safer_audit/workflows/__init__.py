"""What people do with a scan: gate, clean, evaluate, explain, review, decisions, cache admin."""
