"""Zero-shot benchmark evaluation: suite readers (``suites``), the scoring protocols (``protocols``: E2P, FE2E), the
per-suite runner (``runner``), the report (``report``) and the ``python -m e2p_core evaluate`` command (``command``).
The metrics live in ``e2p_core.metrics``."""
