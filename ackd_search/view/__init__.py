"""What the user sees: the terminal's progress, the closing summary and confirmation table, the dashboard's notes,
the report's files and plots, and `export`. It reads the study; it never drives the search."""
