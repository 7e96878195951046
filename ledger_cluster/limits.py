"""Every bound of the public contract in one place (API.md); exceeding one is an explicit
error, never a silent truncation (the one documented exception: page_size is clamped)."""

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
DESCRIPTION_BYTES_MAX = 1024
REQUEST_ID_BYTES_MAX = 128
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
# Items of one batch RPC, and of one log entry (a batch RPC's items for one shard, or the
# writes that group commit gathered while the previous entry was in flight).
BATCH_ITEMS_MAX = 1000
# The largest one-item command a gateway builds (a transfer with every field at its maximum
# encodes to about 6.5 KB; tests/test_security.py builds it), and the largest command a
# node takes: a batch of BATCH_ITEMS_MAX of those. A node refuses anything bigger, which no
# gateway makes, so an internal caller cannot fill a shard's log with oversized entries.
ITEM_COMMAND_BYTES_MAX = 8 * 1024
COMMAND_BYTES_MAX = BATCH_ITEMS_MAX * ITEM_COMMAND_BYTES_MAX
# One message on the public port: a gRPC message either way, or an HTTP request body.
PUBLIC_MESSAGE_BYTES_MAX = 4 * 1024 * 1024
# One message between a gateway and a node (a coalesced batch of 1000 commands fits well).
NODE_MESSAGE_BYTES_MAX = 16 * 1024 * 1024
CURRENCY_CHARACTERS_MAX = 16
METADATA_ENTRIES_MAX = 16
METADATA_KEY_BYTES_MAX = 64
METADATA_VALUE_BYTES_MAX = 256
# A pending transaction or transfer may wait this long for its settle before it expires.
TIMEOUT_SECONDS_MAX = 30 * 24 * 3600
