"""What a run shows: the run's Markdown report and its plots (``report``), the ``Report`` object a user gets
back (``result``), publication tables (``tables``) and figures (``figures``). It reads results and counts;
it trains nothing."""
