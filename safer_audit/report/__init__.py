"""The report stage: the Report and Finding types, building a scan's report, the terminal view."""
