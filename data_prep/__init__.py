"""Data preparation for SOLO: source converters, the packer, the packed-data reader and mixtures.

Console command: `solo-data` (see `data_prep.cli`). The packed on-disk format is described in
`data_prep.packed_format`.
"""
