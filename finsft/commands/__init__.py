"""The commands on top of the stages (``finsft eval``, ``predict``, ``merge``, ``validate`` reporting). Only
:mod:`finsft.cli` turns their exceptions into exit codes."""
