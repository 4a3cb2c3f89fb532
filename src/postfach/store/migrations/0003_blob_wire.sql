-- Schema version 3: what a blob's bytes need before they go out as a POP3 multi-line answer
-- (RFC 1939 §3), learned once at ingest so that RETR need not scan every message three times.
-- Bit 1: every LF is preceded by CR (no line-end repair); bit 2: no line starts with "." (no
-- dot-stuffing). NULL: not known (blobs stored before this version); the reader then scans.
ALTER TABLE blob ADD COLUMN wire INTEGER;
