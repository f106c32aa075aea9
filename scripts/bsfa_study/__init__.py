"""The BSFA study of issue #29 (scripts/reproduce_bsfa.py): runner, protocol and readout."""
