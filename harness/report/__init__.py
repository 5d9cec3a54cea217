"""The report folder: claims.json / .csv, each kind's CSVs and figures, summary.md, the HTML page's
pieces."""
